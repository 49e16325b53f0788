"""The client over TLS (no engine): a fake split server behind aiohttp's TLS with a self-signed
certificate made at test time. The certificate is verified by default; a CA file or an
SSLContext that trusts it connects; ``ssl=False`` (tests only) skips verification; a failed
handshake is a ``ServerError`` with code ``tls`` naming the URL."""
from __future__ import annotations

import asyncio
import ssl
from contextlib import asynccontextmanager

import aiohttp
import pytest

from client_lib import SamplingOptions, ServerError, SplitSession
from client_lib.cli import parse_args, tls_option
from client_lib.gateway.errors import from_server_error
from client_lib.resume import ResumableGeneration
from client_lib.session import client_ssl
from tests.support.tls import self_signed_cert
from tests.unit.client_lib.test_resume import FAST, FakeLayers, FakeServer, _serve
from vllm_split.wire.contract import ErrorCode

MAX_TOKENS = 3


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    return self_signed_cert(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory):
    """Another self-signed certificate: trusting it is no reason to trust the server's."""
    return self_signed_cert(tmp_path_factory.mktemp("other-ca"), common_name="someone else").ca_file


@asynccontextmanager
async def fake_server(tls=None):
    """A fake split server's URL: https:// with ``tls`` (its certificate and key), else http://."""
    context = None
    if tls is not None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(tls.certfile, tls.keyfile)
    runner, url = await _serve(FakeServer(drop_after=[]), context)
    try:
        yield url
    finally:
        await runner.cleanup()


async def _tokens(url: str, **options) -> list[int]:
    async with await SplitSession.create(url, FakeLayers(), sampling=SamplingOptions(max_tokens=MAX_TOKENS),
                                         **options) as session:
        return [event.token_id async for event in session.generate([5, 6, 7])]


async def test_a_trusted_certificate_connects_over_wss(tls):
    async with fake_server() as plain_url:
        expected = await _tokens(plain_url)
    assert len(expected) == MAX_TOKENS
    async with fake_server(tls) as url:
        assert url.startswith("https://")
        assert await _tokens(url, ssl=str(tls.ca_file)) == expected  # a CA file path
        assert await _tokens(url, ssl=tls.ca_file) == expected  # a PathLike
        assert await _tokens(url, ssl=tls.client_context()) == expected  # an SSLContext as is


async def test_the_certificate_is_verified_by_default(tls, other_ca):
    async with fake_server(tls) as url:
        wss = url.replace("https://", "wss://")
        for options in ({}, {"ssl": None}, {"ssl": True}, {"ssl": str(other_ca)}):
            with pytest.raises(ServerError) as refused:
                await _tokens(url, **options)
            assert refused.value.code == ErrorCode.TLS and refused.value.fatal, options
            message = str(refused.value)
            assert f"{wss}/v1/split/session: certificate verification failed" in message, message
            assert "--ca-file" in message


async def test_ssl_false_skips_verification(tls):
    async with fake_server(tls) as url:
        assert len(await _tokens(url, ssl=False)) == MAX_TOKENS


async def test_a_server_without_tls_is_a_clear_error(tls):
    async with fake_server() as plain_url:
        url = plain_url.replace("http://", "https://")
        with pytest.raises(ServerError, match=r"^tls: wss://127\.0\.0\.1:\d+/v1/split/session: TLS handshake failed"):
            await asyncio.wait_for(_tokens(url, ssl=str(tls.ca_file)), 30)


async def test_plain_websocket_to_a_tls_server_fails_cleanly(tls):
    async with fake_server(tls) as url:
        with pytest.raises(aiohttp.ClientError):  # the TLS server drops the plain-text handshake
            await asyncio.wait_for(_tokens(url.replace("https://", "http://")), 30)


async def test_resumable_generation_passes_ssl_through_and_does_not_retry_tls_errors(tls):
    async with fake_server(tls) as url:
        gen = ResumableGeneration(url, FakeLayers(), sampling=SamplingOptions(max_tokens=MAX_TOKENS), policy=FAST,
                                  ssl=str(tls.ca_file))
        assert len([e async for e in gen.generate([5, 6, 7])]) == MAX_TOKENS and gen.num_reconnects == 0
        untrusted = ResumableGeneration(url, FakeLayers(), sampling=SamplingOptions(max_tokens=MAX_TOKENS),
                                        policy=FAST)
        with pytest.raises(ServerError, match="certificate verification failed"):
            async for _ in untrusted.generate([5, 6, 7]):
                pass
        assert untrusted.num_reconnects == 0


def test_ssl_option_values(tls, tmp_path):
    assert client_ssl(None) is True and client_ssl(True) is True and client_ssl(False) is False
    context = ssl.create_default_context()
    assert client_ssl(context) is context
    made = client_ssl(str(tls.ca_file))
    assert made.verify_mode == ssl.CERT_REQUIRED and made.check_hostname
    with pytest.raises(FileNotFoundError):
        client_ssl(str(tmp_path / "missing.pem"))
    with pytest.raises(TypeError, match="ssl: expected"):
        client_ssl(42)


def test_the_cli_tls_options(tls, tmp_path, capsys):
    from client_lib.gateway.serve import parse_args as gateway_args

    base = ["--model", "m", "--prompt", "p"]
    args = parse_args(base)
    assert tls_option(args.ca_file, args.insecure) is None  # verify against the system CAs
    args = parse_args([*base, "--ca-file", str(tls.ca_file)])
    assert tls_option(args.ca_file, args.insecure) == str(tls.ca_file)
    args = parse_args([*base, "--insecure"])
    assert tls_option(args.ca_file, args.insecure) is False
    for bad in (["--ca-file", str(tmp_path / "missing.pem")], ["--ca-file", str(tls.ca_file), "--insecure"]):
        with pytest.raises(SystemExit):
            parse_args([*base, *bad])
    assert "no such file" in capsys.readouterr().err
    args = gateway_args(["--model", "m", "--server-ca-file", str(tls.ca_file)])
    assert tls_option(args.server_ca_file, args.server_insecure) == str(tls.ca_file)
    assert gateway_args(["--model", "m", "--server-insecure"]).server_insecure


def test_the_gateway_answers_a_tls_failure_with_502():
    error = from_server_error(ErrorCode.TLS, "wss://h/v1/split/session: certificate verification failed (x)")
    assert error.status == 502
    assert error.message == ("cannot reach the split server over TLS: wss://h/v1/split/session: certificate "
                             "verification failed (x)")
