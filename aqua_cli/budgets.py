"""What a budget means: ``k`` (dims kept of head_dim), ``--kv-dims`` (key dims stored) and the H2O token
budget all share one grammar, a *ratio* (has a decimal point) or a *count* (an integer).

These functions validate values that are already parsed (numbers) as well as text; the CLI layer turns
comma lists into tuples of numbers with them once (:mod:`aqua_cli.cli`), and configs hold numbers.
"""

from __future__ import annotations

from .errors import ConfigError

Budget = float | int


def ratio_or_count(text: str) -> Budget:
    """An integer string is a count, anything with a decimal point a ratio. Raises ValueError for text
    that is neither."""
    text = text.strip()
    return int(text) if text.lstrip("+-").isdigit() else float(text)


def _number(value: str | Budget, not_bool: str, not_text: str) -> Budget:
    """A budget as a number: text through :func:`ratio_or_count`; a bool is refused (it is an int to Python).
    The messages take the value (``not_bool``, its repr) or the stripped text (``not_text``)."""
    if isinstance(value, bool):
        raise ConfigError(not_bool.format(repr(value)))
    if isinstance(value, str):
        text = value.strip()
        try:
            return ratio_or_count(text)
        except ValueError:
            raise ConfigError(not_text.format(text)) from None
    return value


def parse_k(value: str | Budget) -> Budget:
    """``k`` as the user gives it: a ratio of head_dim (has a decimal point, ``0 < k <= 1``) or a count
    of dimensions (an integer, ``1 <= k <= head_dim``). ``"1"`` is one dimension, ``"1.0"`` all of them."""
    value = _number(value, "invalid k {}", "invalid k '{}': give a ratio such as 0.75 or a number of dimensions such as 48")
    if isinstance(value, float):
        if not (0.0 < value <= 1.0) or value != value:
            raise ConfigError(f"k ratio {value} is outside (0, 1]: give e.g. 0.75, or an integer number of dimensions")
        return value
    if value < 1:
        raise ConfigError(f"k must be at least 1 dimension, got {value}")
    return int(value)


def k_dims(k: str | Budget, head_dim: int) -> int:
    """Number of dimensions kept for ``k`` on heads of ``head_dim``."""
    k = parse_k(k)
    if isinstance(k, float):
        return max(1, min(head_dim, round(k * head_dim)))
    if k > head_dim:
        raise ConfigError(f"k = {k} dimensions is more than head_dim = {head_dim}: give at most {head_dim} or a ratio")
    return k


def parse_kv_dims(value: str | Budget, head_dim: int) -> int:
    """``--kv-dims`` as given: a ratio of head_dim (``0.5``) or a number of dimensions (``32``); returns the
    count. Same grammar as ``k``, with its own messages."""
    try:
        parsed = parse_k(value)
    except ConfigError:
        raise ConfigError(f"invalid --kv-dims {value!r}: give a ratio in (0, 1] such as 0.5, or a number of dimensions such as 32") from None
    if isinstance(parsed, int) and parsed > head_dim:
        raise ConfigError(f"--kv-dims {parsed} is more than head_dim = {head_dim}: give at most {head_dim} or a ratio")
    return k_dims(parsed, head_dim)


def parse_budget(value: str | Budget) -> Budget:
    """``--h2o-budget``: a ratio of the prompt (has a decimal point, ``0 < b <= 1``) or a token count
    (an integer ``>= 2``: one recent token and one heavy hitter at the least)."""
    value = _number(value, "invalid H2O budget {}",
                    "invalid --h2o-budget '{}': give a ratio of the prompt such as 0.5 or a number of tokens such as 256")
    if isinstance(value, float):
        if not 0.0 < value <= 1.0:  # also refuses NaN
            raise ConfigError(f"--h2o-budget ratio {value} is outside (0, 1]: give e.g. 0.5, or an integer number of tokens")
        return value
    if value < 2:
        raise ConfigError(f"--h2o-budget must be at least 2 tokens, got {value}")
    return int(value)
