"""Who a caller is: mTLS subjects matched as parsed distinguished names (a certificate whose common
name is the text `team-a,O=Org` is not team-a), ambiguous or unusable subject configuration refused
at load, and a plaintext client told that the server may expect TLS."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest
from support.inproc import InProcServer

from tkg.server import cli, credentials
from tkg.server import subjects as dn
from tkg.server.config import ConfigError

Code = grpc.StatusCode


# ---- parsing: one reading per text -------------------------------------------------------------


def test_an_escaped_comma_is_one_rdn_and_a_bare_one_two() -> None:
    assert dn.parse("CN=team-a,O=Org") == ((("CN", "team-a"),), (("O", "Org"),))
    assert dn.parse("CN=team-a\\,O=Org") == ((("CN", "team-a,O=Org"),),)
    # Types case-insensitively; a multi-valued RDN is a set; \XX pairs are UTF-8 bytes (as gRPC
    # reports non-ASCII), so the configured text and the reported one meet.
    assert dn.parse("cn=a+UID=7,o=b") == dn.parse("UID=7+CN=a,O=b")
    assert dn.parse("CN=caf\\C3\\A9") == dn.parse("CN=café") == ((("CN", "café"),),)
    assert dn.parse("CN=\\#x") != dn.parse("CN=#78")  # a literal '#' is not a DER value
    for name in (dn.parse("CN=team-a\\,O=Org"), dn.parse("CN=a\\+b+UID=7,O=b\\ ")):
        assert dn.parse(dn.describe(name)) == name


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("CN=team-a, O=Org", "attribute type ' O'"),  # RFC 1779 spacing: refused, not guessed
        ("CN=team-a ,O=Org", "a space at an end of value"),
        ("CN= team-a", "a space at an end of value"),
        ("team-a", "has no '='"),
        ("CN=team-a,O", "'O' has no '='"),
        ("/O=Org/CN=team-a", "slash form"),
        ("CN=team-a;O=Org", "';' unescaped"),
        ("CN=a\\q", "escape '\\\\q'"),
        ("CN=a,", "ends with a separator"),
        ("CN=a+CN=b", "names CN twice"),
        ("", "empty"),
    ],
)
def test_text_that_could_be_read_two_ways_is_refused(text: str, needle: str) -> None:
    with pytest.raises(dn.SubjectError) as err:
        dn.parse(text)
    assert needle in str(err.value), err.value


def test_the_auth_file_refuses_ambiguous_subjects_naming_the_entry() -> None:
    ok = {"name": "team-a", "client_subject": "CN=team-a,O=Org"}
    cases = [
        ([{"name": "team-a", "client_subject": "CN=team-a, O=Org"}], "tenants[0].client_subject: 'CN=team-a, O=Org'"),
        ([ok, {"name": "team-b", "client_subject": "cn=team-a,o=Org"}],
         "tenants[1].client_subject: the same subject as tenants[0]'s"),
        ([{"name": "team-a", "client_subject": 7}], "tenants[0].client_subject: 7; expected an RFC 4514 subject"),
    ]  # fmt: skip
    for entries, needle in cases:
        with pytest.raises(ConfigError) as err:
            credentials.build_table([], [], entries)
        assert needle in str(err.value), err.value
    table = credentials.build_table([], [], [ok], mtls=True)
    assert table.by_subject(["CN=team-a,O=Org"]).tenant.name == "team-a"
    assert table.by_subject(["CN=team-a\\,O=Org"]) is None  # the crafted certificate's report
    assert table.by_subject(["CN=team-a"]) is None and table.by_subject(["O=Org,CN=team-a"]) is None
    assert table.by_subject(["CN=team-a,O"]) is None  # a report that does not parse matches nothing


def test_a_client_subject_without_tls_client_ca_exits_2_naming_both(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    path = tmp_path / "auth.json"
    path.write_text(json.dumps({"tenants": [{"name": "team-b", "client_subject": "CN=team-b"}]}))
    assert cli.main(["--backend", "reference", "--auth-file", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "tenants[0].client_subject" in err and "--tls-client-ca" in err, err


def test_a_reload_adding_a_client_subject_without_tls_client_ca_keeps_the_old_credentials(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "auth.json"
    path.write_text(json.dumps({"tenants": [{"name": "team-a", "token_sha256": "0" * 64}]}))
    args = cli.build_parser().parse_args(["--auth-file", str(path)])
    swapped: list[credentials.AuthTable] = []

    class App:
        def reload_auth(self, table: credentials.AuthTable) -> None:
            swapped.append(table)

    cli.reload_auth(App(), args)  # type: ignore[arg-type]
    assert len(swapped) == 1
    path.write_text(json.dumps({"tenants": [{"name": "team-b", "client_subject": "CN=team-b"}]}))
    cli.reload_auth(App(), args)  # type: ignore[arg-type]
    assert len(swapped) == 1 and "tenants[0].client_subject" in caplog.text and "--tls-client-ca" in caplog.text


# ---- over a real TLS handshake on loopback ---------------------------------------------------


def test_a_crafted_common_name_is_not_the_subject_it_spells() -> None:
    pytest.importorskip("cryptography", reason="the dev extra 'cryptography' makes the test certificates")
    from support.inproc import make_pki, settings

    from tkg.client import Client, errors

    pki = make_pki("team-b", clients={
        "real": "CN=team-a,O=Org",  # two RDNs: team-a's certificate
        "crafted": "CN=team-a\\,O=Org",  # one CN whose text is `team-a,O=Org`, from the same CA
        "cn_only": "CN=team-b,O=Other",  # team-b's common name inside another subject
        "utf8": "CN=équipe,O=Org",
    })  # fmt: skip
    entries = [{"name": "team-a", "client_subject": "CN=team-a,O=Org"},
               {"name": "team-b", "client_subject": "CN=team-b"},
               {"name": "team-c", "client_subject": "CN=équipe,O=Org"}]  # fmt: skip
    table = credentials.build_table([], [], entries, mtls=True)
    s = InProcServer(settings(tls_cert=pki["server_cert"], tls_key=pki["server_key"], tls_client_ca=pki["ca"],
                              auth=table, auth_file="auth.json"))  # fmt: skip

    def client(who: str) -> Client:
        return Client(s.target, timeout=20, root_certificates=pki["ca"], certificate_chain=pki[f"{who}_cert"],
                      private_key=pki[f"{who}_key"])  # fmt: skip

    try:
        with client("real") as c:
            c.create_sequence("secret")
            assert c.get_sequence("secret").sequence_id == "secret"
        for who in ("crafted", "cn_only"):  # the handshake passes (same CA); the identity does not
            with client(who) as c:
                for call in (c.server_info, lambda c=c: c.get_sequence("secret"), lambda c=c: c.release("secret"),
                             lambda c=c: c.export_sequence("secret")):  # fmt: skip
                    with pytest.raises(errors.Unauthenticated):
                        call()
        with client("real") as c:  # untouched by the refused calls
            assert c.get_sequence("secret").sequence_id == "secret"
        with client("utf8") as c:  # gRPC reports it as CN=\C3\A9quipe,O=Org: the same name
            c.create_sequence("mine")
            with pytest.raises(errors.NotFound):
                c.get_sequence("secret")  # team-c's namespace, not team-a's
        with client("client") as c:  # make_pki's CN=team-b: exactly the configured subject
            c.create_sequence("b")
    finally:
        s.stop()


def test_a_plaintext_client_on_a_tls_port_is_told_the_server_may_expect_tls() -> None:
    pytest.importorskip("cryptography", reason="the dev extra 'cryptography' makes the test certificates")
    from support.inproc import make_pki, settings

    from tkg.client import AsyncClient, Client, errors

    pki = make_pki()
    s = InProcServer(settings(tls_cert=pki["server_cert"], tls_key=pki["server_key"]))
    try:
        with Client(s.target, timeout=10) as c, pytest.raises(errors.Unavailable) as err:
            c.server_info()
        assert "the server may expect TLS" in err.value.details and "tls=True" in err.value.details, err.value

        async def aio() -> str:
            async with AsyncClient(s.target, timeout=10) as ac:
                try:
                    await ac.server_info()
                except errors.Unavailable as exc:
                    return exc.details
            return "answered"

        import asyncio

        assert "the server may expect TLS" in asyncio.run(aio())
        with Client(s.target, timeout=10, tls=True, root_certificates=pki["ca"]) as c:
            assert c.server_info().head_dim == 8  # the hint's advice works
    finally:
        s.stop()
