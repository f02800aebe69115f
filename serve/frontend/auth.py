"""Bearer tokens and roles (README "Security").

Each token has a role: `infer` may run inference, the text API, metadata and health; `admin`
may do everything, including repository index/load/unload and statistics. `decide(policy,
method, metadata)` is the whole decision, a plain function (the gRPC interceptor below only
applies it, on grpc.aio): None to go ahead, else the serve.errors exception to answer with
(Unauthenticated for a missing or unknown token, PermissionDenied for a role that may not).
Tokens are compared in constant time (hmac.compare_digest, against every configured token)
and never logged. No token configured: everything is open, as without this module.
"""
from __future__ import annotations

import hmac
import ipaddress
import logging
from collections.abc import Iterable
from dataclasses import dataclass

import grpc

from rnnserve.serve.errors import PermissionDenied, ServeError, Unauthenticated
from rnnserve.serve.frontend.decoding import HANDLER_KINDS

log = logging.getLogger(__name__)

INFER, ADMIN = "infer", "admin"
ROLES = (INFER, ADMIN)
ADMIN_METHODS = frozenset({"RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload", "ModelStatistics"})
HEALTH_SERVICE = "grpc.health.v1.Health"
MAX_TOKEN_CHARS = 4096


@dataclass(frozen=True)
class Policy:
    tokens: tuple[tuple[bytes, str], ...] = ()   # (token, role)
    health_open: bool = True                     # grpc.health.v1 answers without a token

    @property
    def enabled(self) -> bool:
        return bool(self.tokens)


def _token(role: str, token: str, where: str) -> tuple[bytes, str]:
    role = role.strip().lower()
    token = token.strip()
    if role not in ROLES:
        raise ValueError(f"{where}: unknown role {role[:20]!r}; roles are {', '.join(ROLES)}")
    if not token or len(token) > MAX_TOKEN_CHARS or any(c.isspace() for c in token):
        raise ValueError(f"{where}: a token is 1..{MAX_TOKEN_CHARS} characters without spaces")
    return token.encode(), role


def parse_tokens(file_text: str = "", env_text: str = "", file_name: str = "token file") -> tuple:
    """Tokens from a file ("ROLE TOKEN" per line; '#' comments) and RNNSERVE_TOKENS ("ROLE:TOKEN,...").
    ValueError names the line, never the token."""
    tokens = []
    for number, line in enumerate(file_text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        role, _, token = line.partition(" ")
        tokens.append(_token(role, token, f"{file_name} line {number}"))
    for number, item in enumerate((i for i in env_text.split(",") if i.strip()), 1):
        role, sep, token = item.partition(":")
        if not sep:
            raise ValueError(f"RNNSERVE_TOKENS item {number}: expected ROLE:TOKEN")
        tokens.append(_token(role, token, f"RNNSERVE_TOKENS item {number}"))
    return tuple(tokens)


def load_policy(token_file: str, env_tokens: str, health_needs_token: bool) -> Policy:
    text = ""
    if token_file:
        try:
            with open(token_file, encoding="utf-8") as f:
                text = f.read()
        except OSError as exc:
            raise ValueError(f"cannot read the token file {token_file}: {exc.strerror}") from None
    tokens = parse_tokens(text, env_tokens, token_file)
    if token_file and not tokens:
        raise ValueError(f"the token file {token_file} has no tokens")
    return Policy(tokens=tokens, health_open=not health_needs_token)


def required_role(method: str, policy: Policy) -> str | None:
    """The role a full method name ("/package.Service/Method") needs; None = open."""
    service, _, name = method.lstrip("/").partition("/")
    if service == HEALTH_SERVICE and policy.health_open:
        return None
    return ADMIN if name in ADMIN_METHODS else INFER


def bearer(metadata: Iterable[tuple[str, str | bytes]] | None) -> bytes | None:
    """The token of the `authorization: Bearer <token>` metadata, if any."""
    for key, value in metadata or ():
        if key.lower() != "authorization":
            continue
        text = value.decode("latin-1") if isinstance(value, bytes) else value
        scheme, _, token = text.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip().encode("utf-8", "surrogateescape")
    return None


def role_of(policy: Policy, token: bytes) -> str | None:
    """The role of `token`, comparing against every configured token in constant time."""
    found = None
    for known, role in policy.tokens:
        if hmac.compare_digest(known, token) and found is None:
            found = role
    return found


def decide(policy: Policy, method: str, metadata) -> ServeError | None:
    """None: the call may go ahead. Else the error to answer it with."""
    if not policy.enabled:
        return None
    need = required_role(method, policy)
    if need is None:
        return None
    token = bearer(metadata)
    if token is None:
        return Unauthenticated("this server needs a bearer token: send metadata 'authorization: Bearer <token>'")
    role = role_of(policy, token)
    if role is None:
        return Unauthenticated("the bearer token is not valid")
    if need == ADMIN and role != ADMIN:
        return PermissionDenied(f"{method.rsplit('/', 1)[-1]} needs a token with the admin role; "
                                f"this one has the {role} role")
    return None


def warn_if_open(policy: Policy, host: str) -> None:
    """Without tokens, say so when the server listens beyond this machine."""
    if policy.enabled:
        return
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        log.warning("no bearer tokens configured and listening on %s: anyone who can reach the port can "
                    "use every API (see --token-file / RNNSERVE_TOKENS)", host)


def _refusing(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A grpc.aio handler of the same kind as `handler` that answers every call with (code, message)."""
    if handler.response_streaming:
        async def refuse_stream(_request, context):
            await context.abort(code, message)
            yield   # an async generator, as grpc.aio expects of a response stream
        behavior = refuse_stream
    else:
        async def refuse(_request, context):
            await context.abort(code, message)
        behavior = refuse

    make = HANDLER_KINDS[(handler.request_streaming, handler.response_streaming)]
    return make(behavior, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Applies `decide` to every call before its handler runs (grpc.aio)."""

    def __init__(self, policy: Policy, status_for):
        self._policy = policy
        self._status_for = status_for   # grpc_errors.status_for: the one error map

    async def intercept_service(self, continuation, handler_call_details):
        refusal = decide(self._policy, handler_call_details.method, handler_call_details.invocation_metadata)
        handler = await continuation(handler_call_details)
        if refusal is None or handler is None:
            return handler
        code, message = self._status_for(refusal, handler_call_details.method)
        return _refusing(handler, code, message)
