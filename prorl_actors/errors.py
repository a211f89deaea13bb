"""The error a user's input causes (a spec, an override, a data file, a checkpoint): the CLI
prints its message, one clear line or a short list naming the input, and exits 2 without a
traceback. Any other exception is a bug: its traceback stays, and the exit status is 1."""


class InputError(ValueError):
    pass
