"""How the driver presents itself to a server: user identity, application certificate,
security policy and mode, and which server certificates it trusts."""

from __future__ import annotations

from asyncua import ua
from asyncua.client.client import Client
from asyncua.common.utils import ServiceError
from asyncua.crypto import security_policies, uacrypto
from asyncua.crypto.truststore import TrustStore
from asyncua.crypto.validator import CertificateValidator, CertificateValidatorOptions
from cryptography import x509

from agent.core.certs import application_uri
from agent.core.driver import DeviceError
from cleanroom_common.fields import read_secret_file
from drivers.opcua.config import Connection
from drivers.opcua.logs import forbid_in_log

_POLICIES: dict[str, type[security_policies.SecurityPolicy]] = {
    "Basic256Sha256": security_policies.SecurityPolicyBasic256Sha256,
    "Aes128_Sha256_RsaOaep": security_policies.SecurityPolicyAes128Sha256RsaOaep,
    "Aes256_Sha256_RsaPss": security_policies.SecurityPolicyAes256Sha256RsaPss,
}


class ServerCheck:
    """The trust-list check of the server's certificate, remembering a refusal: asyncua
    reports it with the same status a server uses to refuse the agent's certificate, and
    the two call for opposite fixes."""

    def __init__(self, validator: CertificateValidator) -> None:
        self._validator = validator
        self.rejected: str | None = None
        """The status the server's certificate was refused with, if it was."""

    async def __call__(self, cert: x509.Certificate, app: ua.ApplicationDescription) -> None:
        try:
            await self._validator(cert, app)
        except ServiceError as exc:
            self.rejected = ua.StatusCode(ua.UInt32(exc.code)).name
            raise


async def configure_identity(client: Client, conn: Connection) -> ServerCheck | None:
    """Give the client the user identity and the secure channel ``conn`` asks for; a
    certificate, key or trust list that cannot be used is a ``config_error``. Returns the
    check of the server's certificate against ``trust_dir``, if there is one."""
    if conn.username:
        password = _password(conn)
        forbid_in_log(password)
        client.set_user(conn.username)
        client.set_password(password)
    if conn.security_policy == "None":
        if conn.application_uri:
            client.application_uri = conn.application_uri
        return None
    assert conn.certificate is not None and conn.private_key is not None
    try:
        cert = await uacrypto.load_certificate(conn.certificate)
    except (OSError, ValueError) as exc:
        raise DeviceError("config_error", f"certificate {conn.certificate}: {exc}") from exc
    client.application_uri = conn.application_uri or application_uri(cert) or client.application_uri
    check = None
    if conn.trust_dir is not None:
        store = TrustStore([conn.trust_dir], [])
        try:
            await store.load()
        except (OSError, ValueError) as exc:  # missing or empty directory, unreadable file
            raise DeviceError("config_error", f"trust_dir {conn.trust_dir}: {exc}") from exc
        check = ServerCheck(
            CertificateValidator(
                CertificateValidatorOptions.TRUSTED_VALIDATION | CertificateValidatorOptions.PEER_SERVER,
                store,
            )
        )
        client.certificate_validator = check
    try:
        await client.set_security(
            _POLICIES[conn.security_policy],
            certificate=str(conn.certificate),
            private_key=str(conn.private_key),
            server_certificate=str(conn.server_certificate) if conn.server_certificate else None,
            mode=getattr(ua.MessageSecurityMode, conn.security_mode),
        )
    except (FileNotFoundError, PermissionError, IsADirectoryError, ValueError) as exc:
        raise DeviceError("config_error", f"certificate, key or server certificate: {exc}") from exc
    return check


def _password(conn: Connection) -> str:
    if conn.password is not None:
        return conn.password.get_secret_value()
    if conn.password_file is not None:
        try:
            return read_secret_file(conn.password_file)
        except OSError as exc:
            raise DeviceError("config_error", f"password_file {conn.password_file}: {exc.strerror}") from exc
        except UnicodeDecodeError:
            raise DeviceError("config_error", f"password_file {conn.password_file}: not UTF-8 text") from None
    return ""
