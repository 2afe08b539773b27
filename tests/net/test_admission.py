"""Experiment admission: owner keys, tokens treated as hostile, the policy, the manifest section."""

from __future__ import annotations

import os
import time
from pathlib import Path

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

from volunteer.manifest import ManifestError
from volunteer.manifest.admission import (
    AdmissionSpec,
    OwnerKeyFormatError,
    format_owner_key,
    parse_admission,
    parse_owner_key,
    peer_id_problem,
)
from volunteer.net import admission as adm
from volunteer.net import admission_files as admf

NOW = 1_800_000_000.0
SHA_PEER = "QmNnooDu7bfjPFoTZYxMNLWUQJyrVwtbZg5gBMjTezGAJN"


def new_peer() -> str:
    return ID.from_pubkey(create_new_key_pair().public_key).to_base58()


@pytest.fixture(scope="module")
def owner(tmp_path_factory: pytest.TempPathFactory):
    return admf.create_owner_key(tmp_path_factory.mktemp("owner") / "owner.key")


@pytest.fixture(scope="module")
def peers() -> list[str]:
    return [new_peer() for _ in range(3)]


def token_for(owner, peer: str, *, experiment: str = "exp", days: float = 30.0,
              issued: float = NOW) -> bytes:
    return adm.issue_token(owner, experiment, peer, expires=issued + days * 86400, issued_at=issued)


def repack(token: bytes, **changes: object) -> bytes:
    """The token with payload fields changed and the old signature kept."""
    payload, sig = msgpack.unpackb(token)
    obj = msgpack.unpackb(payload)
    obj.update(changes)
    return msgpack.packb([msgpack.packb(obj, use_bin_type=True), sig], use_bin_type=True)


def resign(owner, obj: dict, domain: bytes = adm.TOKEN_DOMAIN) -> bytes:
    """A token whose (possibly malformed) payload carries a valid owner signature."""
    payload = msgpack.packb(obj, use_bin_type=True)
    return msgpack.packb([payload, owner.sign(domain + payload).signature], use_bin_type=True)


def verify(token: object, owner, peer: str, *, experiment: str = "exp", now: float = NOW):
    return adm.verify_token(token, owner=adm.owner_public_key(owner), experiment=experiment,
                            peer_id=peer, now=now)


# ---- tokens -----------------------------------------------------------------------------


def test_token_round_trip(owner, peers):
    token = token_for(owner, peers[0])
    assert len(token) <= adm.MAX_TOKEN_BYTES
    got = verify(token, owner, peers[0])
    assert got == adm.AdmissionToken("exp", peers[0], int(NOW), int(NOW) + 30 * 86400,
                                     adm.owner_public_key(owner))
    assert got.owner_text == adm.owner_key_text(owner) == format_owner_key(got.owner)
    assert adm.decode_token(token) == got
    assert verify(token, owner, peers[0], now=got.expires) == got  # valid up to its expiry second


def test_sha256_peer_ids_are_accepted(owner):
    assert verify(token_for(owner, SHA_PEER), owner, SHA_PEER).peer_id == SHA_PEER


@pytest.mark.parametrize("field", ["exp", "id", "x", "iat"])
def test_tampered_payload_is_forged(owner, peers, field):
    token = token_for(owner, peers[0])
    value = {"exp": int(NOW) + 3650 * 86400, "id": peers[1], "x": "other", "iat": int(NOW) - 1}[field]
    with pytest.raises(adm.ForgedTokenError):
        adm.decode_token(repack(token, **{field: value}))
    with pytest.raises(adm.ForgedTokenError):
        verify(repack(token, **{field: value}), owner, peers[0], experiment="exp")


def test_flipped_signature_bit_is_forged(owner, peers):
    payload, sig = msgpack.unpackb(token_for(owner, peers[0]))
    bad = msgpack.packb([payload, bytes([sig[0] ^ 1]) + sig[1:]])
    with pytest.raises(adm.ForgedTokenError):
        verify(bad, owner, peers[0])


def test_signature_without_the_domain_is_forged(owner, peers):
    obj = msgpack.unpackb(msgpack.unpackb(token_for(owner, peers[0]))[0])
    with pytest.raises(adm.ForgedTokenError):
        verify(resign(owner, obj, domain=b""), owner, peers[0])


def test_token_from_another_owner_is_refused(owner, peers, tmp_path):
    stranger = admf.create_owner_key(tmp_path / "stranger.key")
    with pytest.raises(adm.WrongOwnerError):
        verify(token_for(stranger, peers[0]), owner, peers[0])
    # claiming the real owner's key in the payload does not help: the signature then fails
    forged = repack(token_for(stranger, peers[0]), o=adm.owner_public_key(owner))
    with pytest.raises(adm.ForgedTokenError):
        verify(forged, owner, peers[0])


def test_expired_wrong_experiment_wrong_peer(owner, peers):
    token = token_for(owner, peers[0], days=1)
    with pytest.raises(adm.ExpiredTokenError):
        verify(token, owner, peers[0], now=NOW + 86400 + 1)
    with pytest.raises(adm.WrongExperimentError):
        verify(token, owner, peers[0], experiment="other")
    with pytest.raises(adm.WrongPeerError):
        verify(token, owner, peers[1])


def test_oversized_token_is_refused_before_decoding(owner, peers):
    token = token_for(owner, peers[0])
    with pytest.raises(adm.MalformedTokenError, match="1 to 1024 bytes"):
        adm.decode_token(token + b"\x00" * (adm.MAX_TOKEN_BYTES + 1 - len(token)))
    with pytest.raises(adm.MalformedTokenError):
        adm.decode_token(token + b"\x00")  # trailing bytes after the token


GARBAGE = [
    b"", b"\xc1", b"\x92", msgpack.packb([1, 2]), msgpack.packb([b"x", b"y"]),
    msgpack.packb([b"x", b"y", b"z"]), msgpack.packb({"a": 1}), msgpack.packb([b"x", b"s" * 64]),
    msgpack.packb([msgpack.packb([1, 2, 3]), b"s" * 64]), b"\xdd\xff\xff\xff\xff",
    "a string", None, [b"x", b"y"], 12,
]


@pytest.mark.parametrize("garbage", GARBAGE, ids=range(len(GARBAGE)))
def test_garbage_is_malformed(garbage, peers):
    with pytest.raises(adm.MalformedTokenError):
        adm.decode_token(garbage)


def _base_payload(owner, peer: str) -> dict:
    return {"v": 1, "x": "exp", "id": peer, "iat": int(NOW), "exp": int(NOW) + 60,
            "o": adm.owner_public_key(owner)}


BAD_FIELDS = [
    {"v": 2}, {"v": True}, {"x": "Bad Name"}, {"x": 7}, {"id": "not-a-peer"}, {"id": b"bytes"},
    {"iat": 1.5}, {"exp": True}, {"exp": -1}, {"exp": 2**41}, {"iat": int(NOW) + 61},
    {"exp": int(NOW) + adm.MAX_VALIDITY_S + 1}, {"o": b"\x00" * 32}, {"o": b"short"},
    {"extra": 1},
]


@pytest.mark.parametrize("change", BAD_FIELDS, ids=[str(c) for c in BAD_FIELDS])
def test_validly_signed_but_malformed_payload_is_refused(owner, peers, change):
    token = resign(owner, {**_base_payload(owner, peers[0]), **change})
    with pytest.raises(adm.MalformedTokenError):
        adm.decode_token(token)


def test_issue_refuses_bad_input(owner, peers):
    with pytest.raises(adm.AdmissionError, match="bad peer id"):
        adm.issue_token(owner, "exp", "QmNotAPeer", expires=NOW + 60, issued_at=NOW)
    with pytest.raises(adm.AdmissionError, match="experiment name"):
        adm.issue_token(owner, "../etc", peers[0], expires=NOW + 60, issued_at=NOW)
    with pytest.raises(adm.AdmissionError, match="expire after"):
        adm.issue_token(owner, "exp", peers[0], expires=NOW - 1, issued_at=NOW)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=1100))
def test_fuzz_random_bytes_only_typed_errors(data):
    policy = adm.AdmissionPolicy(b"\x58" + b"\x66" * 31, (), "exp")  # the Ed25519 base point
    with pytest.raises(adm.AdmissionError):
        adm.decode_token(data)
    assert policy.admits(SHA_PEER, data) is False


_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=80)
    | st.binary(max_size=80),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=7),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(changes=st.dictionaries(st.sampled_from(sorted(adm._PAYLOAD_KEYS | {"zz"})), _values, max_size=3),
       drop=st.sets(st.sampled_from(sorted(adm._PAYLOAD_KEYS)), max_size=1))
def test_fuzz_signed_payload_fields_only_typed_errors(owner, peers, changes, drop):
    """Validly signed payloads with fields replaced or dropped: a token or a typed error."""
    obj = {**_base_payload(owner, peers[0]), **changes}
    token = resign(owner, {k: v for k, v in obj.items() if k not in drop})
    try:
        got = verify(token, owner, peers[0])
    except adm.AdmissionError:
        return
    assert got.peer_id == peers[0] and got.experiment == "exp" and not got.expired(NOW)


# ---- policy -----------------------------------------------------------------------------


def test_open_policy_admits_everyone(peers):
    policy = adm.AdmissionPolicy(None, (), "exp")
    assert policy.open
    assert policy.admits(peers[0], None, NOW)
    assert policy.admits(peers[0], b"garbage", NOW)
    assert policy.explain(peers[0], None, NOW) is None
    assert adm.AdmissionPolicy.from_spec(AdmissionSpec(), "exp").open


def test_owner_policy(owner, peers):
    policy = adm.AdmissionPolicy(adm.owner_key_text(owner), [peers[2]], "exp")
    assert not policy.open
    token = token_for(owner, peers[0], days=1)
    for _ in range(2):  # the second round is answered from the cache: same outcome
        assert policy.admits(peers[0], token, NOW)
        assert not policy.admits(peers[1], token, NOW)  # someone else's token
        assert not policy.admits(peers[0], token, NOW + 2 * 86400)  # expired since
        assert not policy.admits(peers[1], None, NOW)
        assert not policy.admits(peers[1], b"\x92garbage", NOW)
        assert policy.admits(peers[2], None, NOW)  # listed
    assert not policy.admits(peers[0], token_for(owner, peers[0], experiment="other"), NOW)
    assert not policy.admits(["not", "a", "str"], token, NOW)  # type: ignore[arg-type]
    assert not policy.admits(peers[0], "a str token", NOW)  # type: ignore[arg-type]
    assert isinstance(policy.check(peers[0], token, NOW), adm.AdmissionToken)
    assert policy.check(peers[2], None, NOW) is None
    with pytest.raises(adm.NotAdmittedError):
        policy.check(peers[1], None, NOW)
    with pytest.raises(adm.WrongPeerError):
        policy.check(peers[1], token, NOW)


def test_policy_as_the_records_admit_filter(owner, peers):
    from volunteer.net.records import ServerEntry

    policy = adm.AdmissionPolicy(adm.owner_public_key(owner), (), "exp")
    now = time.time()

    def entry(peer: str, token: bytes | None) -> ServerEntry:
        return ServerEntry(experiment="exp", prefix="ffn.", peer_id=peer, seq=1, expires=now + 60,
                           children=("1",), state="serving", load=0.0, token=token)

    token = token_for(owner, peers[0], issued=now)
    assert policy.admits_entry(entry(peers[0], token))
    assert not policy.admits_entry(entry(peers[1], token))
    assert not policy.admits_entry(entry(peers[0], None))


def test_listed_only_policy_ignores_tokens(owner, peers):
    policy = adm.AdmissionPolicy.from_spec(AdmissionSpec(owner=None, peers=(peers[0],)), "exp")
    assert not policy.open
    assert policy.admits(peers[0], None, NOW)
    assert not policy.admits(peers[1], token_for(owner, peers[1]), NOW)


def test_explain_tells_the_operator_what_to_do(owner, peers):
    policy = adm.AdmissionPolicy(adm.owner_public_key(owner), (), "exp")
    message = policy.explain(peers[0], None, NOW)
    assert message is not None and "\n" not in message
    assert peers[0] in message and "volunteer admission install" in message
    assert policy.explain(peers[0], token_for(owner, peers[0]), NOW) is None


def test_policy_cache_is_bounded(owner, peers, monkeypatch):
    monkeypatch.setattr(adm, "CACHE_SIZE", 8)
    policy = adm.AdmissionPolicy(adm.owner_public_key(owner), (), "exp")
    good = token_for(owner, peers[0])
    assert policy.admits(peers[0], good, NOW)
    for i in range(50):
        assert not policy.admits(peers[0], b"\x92" + i.to_bytes(2, "big"), NOW)
    assert len(policy._cache) == 8
    assert policy.admits(peers[0], good, NOW)  # evicted, verified again


def test_policy_rejects_bad_owner_key():
    with pytest.raises(OwnerKeyFormatError):
        adm.AdmissionPolicy("ed25519:xyz", (), "exp")
    with pytest.raises(OwnerKeyFormatError):
        adm.AdmissionPolicy(b"\x00" * 32, (), "exp")  # raw bytes: 32, but not a valid point
    with pytest.raises(OwnerKeyFormatError):
        adm.verify_token(b"x", owner=b"\x01" * 32, experiment="exp", peer_id=SHA_PEER)
    with pytest.raises(adm.AdmissionError):
        adm.AdmissionPolicy(None, (), "Not A Name")


# ---- owner key files --------------------------------------------------------------------


def test_owner_key_file_created_private_and_never_overwritten(tmp_path):
    path = tmp_path / "owner.key"
    key = admf.create_owner_key(path)
    assert path.stat().st_mode & 0o777 == 0o600
    before = path.read_bytes()
    with pytest.raises(adm.OwnerKeyFileError, match="refusing to overwrite"):
        admf.create_owner_key(path)
    assert path.read_bytes() == before
    assert adm.owner_public_key(admf.load_owner_key(path)) == adm.owner_public_key(key)


def test_owner_key_file_problems(tmp_path):
    with pytest.raises(adm.OwnerKeyFileError, match="no such owner key file"):
        admf.load_owner_key(tmp_path / "missing.key")
    path = tmp_path / "owner.key"
    admf.create_owner_key(path)
    os.chmod(path, 0o644)
    with pytest.raises(adm.OwnerKeyFileError, match="chmod 600"):
        admf.load_owner_key(path)
    bad = tmp_path / "bad.key"
    for text in (b"", b"hello\n", f"{adm.OWNER_KEY_HEADER}\nzz\n".encode(), b"\x00" * 4096):
        bad.write_bytes(text)
        os.chmod(bad, 0o600)
        with pytest.raises(adm.OwnerKeyFileError, match="not an owner key file"):
            admf.load_owner_key(bad)


# ---- the node's own token ---------------------------------------------------------------


def test_install_and_load_token(owner, peers, tmp_path):
    home = tmp_path / "home"
    assert admf.load_token(home, "exp") is None
    token = token_for(owner, peers[0], issued=time.time())
    text = (adm.encode_token_text(token) + "\n").encode()
    got = admf.install_token(home, "exp", text, peer_id=peers[0], now=time.time())
    assert got.peer_id == peers[0]
    path = admf.token_path(home, "exp")
    assert path == home / "admission" / "exp.token"
    assert path.stat().st_mode & 0o777 == 0o600
    assert admf.load_token(home, "exp") == token
    admf.install_token(home, "exp", token)  # raw bytes work too
    assert admf.load_token(home, "exp") == token


@pytest.mark.parametrize(("case", "error"), [
    ("garbage", adm.MalformedTokenError), ("experiment", adm.WrongExperimentError),
    ("peer", adm.WrongPeerError), ("expired", adm.ExpiredTokenError), ("tampered", adm.ForgedTokenError),
])
def test_install_refuses_bad_tokens_and_writes_nothing(owner, peers, tmp_path, case, error):
    good = token_for(owner, peers[0], issued=time.time())
    data = {"garbage": b"not base64 at all!", "experiment": token_for(owner, peers[0], experiment="other"),
            "peer": token_for(owner, peers[1]), "expired": token_for(owner, peers[0], issued=NOW - 10**8),
            "tampered": repack(good, exp=int(time.time()) + 10**6)}[case]
    with pytest.raises(error):
        admf.install_token(tmp_path, "exp", data, peer_id=peers[0], now=time.time())
    assert not admf.token_path(tmp_path, "exp").exists()


def test_corrupt_token_file_is_a_typed_error(tmp_path):
    path = admf.token_path(tmp_path, "exp")
    path.parent.mkdir()
    path.write_bytes(b"\x92\xc4")
    with pytest.raises(adm.MalformedTokenError, match="install a new token"):
        admf.load_token(tmp_path, "exp")


def test_token_path_refuses_names_that_escape_the_home(tmp_path):
    for name in ("../x", "a/b", "", "X"):
        with pytest.raises(adm.AdmissionError):
            admf.token_path(tmp_path, name)


# ---- the manifest section ---------------------------------------------------------------


def test_manifest_section_absent_is_open():
    assert parse_admission(None).open


def test_manifest_section_round_trip(owner, peers):
    spec = parse_admission({"owner": adm.owner_key_text(owner), "peers": [peers[0], SHA_PEER]})
    assert spec == AdmissionSpec(adm.owner_key_text(owner), (peers[0], SHA_PEER))
    assert not spec.open
    assert parse_owner_key(spec.owner) == adm.owner_public_key(owner)
    assert parse_admission({"peers": [peers[0]]}).owner is None


@pytest.mark.parametrize(("raw", "key_path", "fragment"), [
    ([], "admission", "expected a mapping"),
    ({}, "admission", "remove the section for an open experiment"),
    ({"owners": "x"}, "admission.owners", "unknown key (expected one of: owner, peers)"),
    ({"owner": "rsa:abcd"}, "admission.owner", "volunteer admission keygen"),
    ({"owner": "ed25519:" + "AB" * 32}, "admission.owner", "64 lowercase hex digits"),
    ({"owner": "ed25519:" + "00" * 32}, "admission.owner", "not a valid Ed25519 public key"),
    ({"owner": 5}, "admission.owner", "expected ed25519:"),
    ({"peers": "12D3KooW"}, "admission.peers", "expected a list"),
    ({"peers": ["0OIl"]}, "admission.peers[0]", "volunteer admission show"),
    ({"peers": [SHA_PEER, SHA_PEER]}, "admission.peers[1]", "listed twice"),
    ({"peers": ["1" + SHA_PEER]}, "admission.peers[0]", "expected a libp2p peer id"),
    ({"peers": [SHA_PEER] * 2000}, "admission.peers", "at most 1024"),
])
def test_manifest_section_errors_are_one_line(raw, key_path, fragment):
    with pytest.raises(ManifestError) as info:
        parse_admission(raw, "exp.yaml")
    message = str(info.value)
    assert info.value.key_path == key_path
    assert message.startswith(f"exp.yaml: {key_path}: ") and "\n" not in message
    assert fragment in message, message


def test_peer_id_problem():
    assert peer_id_problem(SHA_PEER) is None
    assert peer_id_problem(new_peer()) is None
    for bad in ("", "x" * 200, "Qm" + "0" * 44, SHA_PEER[:-1], 5, None):
        assert peer_id_problem(bad) is not None


def test_format_owner_key_round_trip(owner):
    raw = adm.owner_public_key(owner)
    assert parse_owner_key(format_owner_key(raw)) == raw
    with pytest.raises(OwnerKeyFormatError):
        format_owner_key(b"short")


def test_token_text_is_bounded():
    with pytest.raises(adm.MalformedTokenError):
        adm.decode_token_text(b"A" * (adm.MAX_TOKEN_TEXT_CHARS + 4))
    assert Path(adm.ADMISSION_DIR).name == "admission"
