"""Errors that describe bad user input; the CLI prints them as one clear line."""


class RsjaxError(Exception):
    """A problem with the user's input (file, architecture, sigma, alpha, n, data...)."""


class CheckpointError(RsjaxError):
    """A file is not a checkpoint rsjax can read or convert."""


class DataError(RsjaxError):
    """A dataset or data file is missing or does not fit."""


def check_positive(name, value):
    if not (value > 0):
        raise RsjaxError(f"{name} must be > 0, got {value}")
    return value


def check_alpha(alpha):
    if not (0.0 < alpha < 1.0):
        raise RsjaxError(f"alpha must be in (0, 1), got {alpha}")
    return alpha


def check_count(name, value, minimum=1):
    if int(value) != value or value < minimum:
        raise RsjaxError(f"{name} must be an integer >= {minimum}, got {value}")
    return int(value)
