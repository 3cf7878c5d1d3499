"""Errors raised for user mistakes, before anything compiles."""


class ConfigError(ValueError):
  """A sweep configuration or its data is invalid.

  The message names the field, the value given and what would be accepted.
  """


def config_error(field: str, value, accepted: str) -> ConfigError:
  """Builds the one message format every config check uses."""
  shown = repr(value)
  if len(shown) > 200:
    shown = shown[:200] + '...'
  return ConfigError(f'{field}={shown} is invalid: {accepted}.')
