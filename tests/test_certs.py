"""``cleanroom-agent certs create``: the application certificate OPC UA servers check.

That the certificate actually opens secured channels is tested in test_opcua_driver.py
(every security policy and mode runs with certificates made by this module).
"""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from cryptography.x509.oid import ExtendedKeyUsageOID

from agent.cli import main
from agent.core.certs import application_uri


def load(out: Path) -> x509.Certificate:
    return x509.load_der_x509_certificate((out / "cert.der").read_bytes())


def test_create_writes_der_cert_with_uri_and_private_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "pki"
    rc = main(
        [
            "certs",
            "create",
            "--out",
            str(out),
            "--uri",
            "urn:site:line1:agent",
            "--hostname",
            "gw1",
            "--hostname",
            "gw1.plant.local",
            "--hostname",
            "10.0.4.21",
            "--days",
            "30",
        ]
    )
    assert rc == 0
    cert = load(out)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["urn:site:line1:agent"]
    assert san.get_values_for_type(x509.DNSName) == ["gw1", "gw1.plant.local"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.0.4.21"]
    assert application_uri(cert) == "urn:site:line1:agent"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.CLIENT_AUTH in eku and ExtendedKeyUsageOID.SERVER_AUTH not in eku
    assert 29 <= (cert.not_valid_after_utc - cert.not_valid_before_utc).days <= 30
    key = load_pem_private_key((out / "key.pem").read_bytes(), None)
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()  # type: ignore[union-attr]
    assert stat.S_IMODE((out / "key.pem").stat().st_mode) == 0o600, "the key is readable by its owner only"
    assert "urn:site:line1:agent" in capsys.readouterr().out


def test_existing_certificate_is_not_replaced_without_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["certs", "create", "--out", str(tmp_path), "--uri", "urn:a"]
    assert main(args) == 0
    first = load(tmp_path).serial_number
    assert main(args) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert load(tmp_path).serial_number == first
    assert main([*args, "--force", "--server"]) == 0
    replaced = load(tmp_path)
    assert replaced.serial_number != first
    assert (
        ExtendedKeyUsageOID.SERVER_AUTH
        in replaced.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--uri", "not a uri"], "is not a URI"),
        (["--uri", "urn:a", "--days", "0"], "--days must be at least 1"),
    ],
)
def test_bad_input_is_a_clear_error_with_exit_code_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert main(["certs", "create", "--out", str(tmp_path / "x"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "x" / "cert.der").exists()


def test_unwritable_directory_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["certs", "create", "--out", str(blocker / "sub"), "--uri", "urn:a"]) == 2
    assert "cannot create" in capsys.readouterr().err
