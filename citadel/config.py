"""Settings: the one place that reads the environment and ``.env``.

Every variable of the contract is a field here, named by its alias. A bad value
stops start-up through :func:`describe_settings_error`, which names the variable
and never repeats its value.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from limits import parse as parse_limit
from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

Operation = Literal["encrypt", "decrypt"]

DEFAULT_ACL: dict[str, list[Operation]] = {
    "sentinel": ["encrypt"],
    "conductor": ["decrypt"],
    "api-gateway": [],
    "alchemist": [],
}


class Settings(BaseSettings):
    """Citadel's configuration, from the environment and an optional ``.env``."""

    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        validate_by_name=True,
        validate_by_alias=True,
        case_sensitive=False,
        hide_input_in_errors=True,
    )

    env: Literal["development", "production"] = Field(
        "development", validation_alias=AliasChoices("CITADEL_ENV", "env")
    )
    provider: Literal["local", "evervault"] = Field(
        "local", validation_alias=AliasChoices("CITADEL_PROVIDER", "provider")
    )
    api_keys: dict[str, list[str]] | None = Field(
        None, validation_alias=AliasChoices("CITADEL_API_KEYS", "api_keys")
    )
    api_keys_file: Path | None = Field(
        None, validation_alias=AliasChoices("CITADEL_API_KEYS_FILE", "api_keys_file")
    )
    acl: dict[str, list[Operation]] = Field(
        default_factory=lambda: {k: list(v) for k, v in DEFAULT_ACL.items()},
        validation_alias=AliasChoices("CITADEL_ACL", "acl"),
    )
    rate_limit_per_caller: str = Field(
        "100/minute",
        validation_alias=AliasChoices("CITADEL_RATE_LIMIT_PER_CALLER", "rate_limit_per_caller"),
    )
    rate_limit_per_user: str = Field(
        "10/minute",
        validation_alias=AliasChoices("CITADEL_RATE_LIMIT_PER_USER", "rate_limit_per_user"),
    )
    rate_limit_auth_failures: str = Field(
        "20/minute",
        validation_alias=AliasChoices(
            "CITADEL_RATE_LIMIT_AUTH_FAILURES", "rate_limit_auth_failures"
        ),
    )
    rate_limit_storage_uri: str = Field(
        "memory://",
        validation_alias=AliasChoices("CITADEL_RATE_LIMIT_STORAGE_URI", "rate_limit_storage_uri"),
    )
    breaker_fail_max: Annotated[int, Field(ge=1)] = Field(
        5, validation_alias=AliasChoices("CITADEL_BREAKER_FAIL_MAX", "breaker_fail_max")
    )
    breaker_reset_s: Annotated[float, Field(gt=0)] = Field(
        1.0, validation_alias=AliasChoices("CITADEL_BREAKER_RESET_S", "breaker_reset_s")
    )
    breaker_reset_max_s: Annotated[float, Field(gt=0)] = Field(
        16.0, validation_alias=AliasChoices("CITADEL_BREAKER_RESET_MAX_S", "breaker_reset_max_s")
    )
    max_plaintext_bytes: Annotated[int, Field(ge=1, le=1_048_576)] = Field(
        4096, validation_alias=AliasChoices("CITADEL_MAX_PLAINTEXT_BYTES", "max_plaintext_bytes")
    )
    local_keyring: Path = Field(
        Path(".citadel/keyring.json"),
        validation_alias=AliasChoices("CITADEL_LOCAL_KEYRING", "local_keyring"),
    )
    log_format: Literal["json", "console"] = Field(
        "json", validation_alias=AliasChoices("CITADEL_LOG_FORMAT", "log_format")
    )
    log_level: Literal["debug", "info", "warning", "error", "critical"] = Field(
        "info", validation_alias=AliasChoices("CITADEL_LOG_LEVEL", "log_level")
    )
    audit_pseudonym_key: SecretStr | None = Field(
        None, validation_alias=AliasChoices("CITADEL_AUDIT_PSEUDONYM_KEY", "audit_pseudonym_key")
    )
    docs: bool | None = Field(None, validation_alias=AliasChoices("CITADEL_DOCS", "docs"))
    decrypt_concurrency: Annotated[int, Field(ge=1, le=1024)] = Field(
        64, validation_alias=AliasChoices("CITADEL_DECRYPT_CONCURRENCY", "decrypt_concurrency")
    )

    evervault_app_id: str | None = Field(
        None, validation_alias=AliasChoices("EVERVAULT_APP_ID", "evervault_app_id")
    )
    evervault_api_key: SecretStr | None = Field(
        None, validation_alias=AliasChoices("EVERVAULT_API_KEY", "evervault_api_key")
    )
    evervault_api_url: str = Field(
        "https://api.evervault.com/",
        validation_alias=AliasChoices("EVERVAULT_API_URL", "evervault_api_url"),
    )
    evervault_curve: Literal["SECP256K1", "SECP256R1"] = Field(
        "SECP256K1", validation_alias=AliasChoices("EVERVAULT_CURVE", "evervault_curve")
    )
    evervault_timeout_s: Annotated[float, Field(gt=0, le=120)] = Field(
        5.0, validation_alias=AliasChoices("EVERVAULT_TIMEOUT_S", "evervault_timeout_s")
    )

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_level(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @field_validator("evervault_curve", mode="before")
    @classmethod
    def _upper_curve(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("evervault_api_url")
    @classmethod
    def _slash_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http(s) URL")
        # The SDK concatenates base_url + path, so the slash is load-bearing.
        return value if value.endswith("/") else value + "/"

    @field_validator("rate_limit_per_caller", "rate_limit_per_user", "rate_limit_auth_failures")
    @classmethod
    def _valid_limit(cls, value: str) -> str:
        try:
            parse_limit(value)
        except ValueError:
            raise ValueError("must be a rate limit such as 100/minute") from None
        return value

    @field_validator("rate_limit_storage_uri")
    @classmethod
    def _valid_storage(cls, value: str) -> str:
        if not value.startswith(("memory://", "redis://", "rediss://", "redis+unix://")):
            raise ValueError("must be memory:// or a redis:// URI")
        return value

    @field_validator("api_keys")
    @classmethod
    def _valid_keys(cls, value: dict[str, list[str]] | None) -> dict[str, list[str]] | None:
        if value is not None:
            check_api_keys_shape(value)
        return value

    @property
    def docs_enabled(self) -> bool:
        """API docs default to on in development and off in production."""
        return self.docs if self.docs is not None else self.env == "development"

    @property
    def dev_dir(self) -> Path:
        """Where development-only generated files live: beside the keyring."""
        return self.local_keyring.parent

    def load_api_keys_file(self) -> dict[str, list[str]] | None:
        """Read ``CITADEL_API_KEYS_FILE``; raises :class:`SettingError` naming the variable."""
        if self.api_keys_file is None:
            return None
        try:
            raw = json.loads(self.api_keys_file.read_bytes())
        except OSError:
            raise SettingError("CITADEL_API_KEYS_FILE", "cannot be read") from None
        except ValueError:
            raise SettingError("CITADEL_API_KEYS_FILE", "is not valid JSON") from None
        try:
            check_api_keys_shape(raw)
        except ValueError as exc:
            raise SettingError("CITADEL_API_KEYS_FILE", str(exc)) from None
        return dict(raw)


class SettingError(Exception):
    """A setting that cannot be used; the message names it and never holds its value."""

    def __init__(self, variable: str, problem: str) -> None:
        self.variable = variable
        self.problem = problem
        super().__init__(f"{variable} {problem}")


def check_api_keys_shape(value: Any) -> None:
    """Raise ``ValueError`` unless ``value`` maps caller names to lists of key strings."""
    if not isinstance(value, dict) or not value:
        raise ValueError("must be a JSON object of caller name to a list of keys")
    for caller, keys in value.items():
        if not isinstance(caller, str) or not caller:
            raise ValueError("has an empty caller name")
        if not isinstance(keys, list) or not all(isinstance(k, str) and k for k in keys):
            raise ValueError("must map each caller to a list of non-empty key strings")


def describe_settings_error(exc: Exception) -> str:
    """One line naming the offending variable(s), never a value."""
    if isinstance(exc, SettingError):
        return f"invalid setting: {exc}"
    if isinstance(exc, ValidationError):
        parts = []
        for err in exc.errors(include_input=False, include_url=False, include_context=False):
            field = str(err["loc"][0]) if err["loc"] else "?"
            parts.append(f"{_env_name(field)} ({_safe_msg(err['type'], err['msg'])})")
        return "invalid setting: " + "; ".join(parts)
    if isinstance(exc, SettingsError):
        # pydantic-settings words these "error parsing value for field "x" from source ...".
        text = str(exc)
        for name in Settings.model_fields:
            if f'"{name}"' in text:
                return f"invalid setting: {_env_name(name)} (not valid JSON)"
        return "invalid setting: a JSON setting could not be parsed"
    return f"invalid setting: {type(exc).__name__}"


def _safe_msg(kind: str, msg: str) -> str:
    # Messages of our own validators and pydantic's type errors hold no input;
    # anything else is reduced to its type so that no value can slip through.
    if kind in {"value_error", "assertion_error"}:
        return msg.removeprefix("Value error, ")
    if kind in {"literal_error", "int_parsing", "float_parsing", "bool_parsing", "missing"}:
        return msg
    if kind.startswith(("greater_than", "less_than", "dict_type", "list_type", "string_type")):
        return msg
    return kind


def _env_name(field: str) -> str:
    info = Settings.model_fields.get(field)
    alias = info.validation_alias if info else None
    if isinstance(alias, AliasChoices):
        first = alias.choices[0]
        return first if isinstance(first, str) else field
    return field.upper()
