"""C2PA provenance: signing generated PNGs, verifying them, and catching tampering and bad credentials."""
from __future__ import annotations

import datetime as dt
import io
import pickle
import stat
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import version

import c2pa
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from PIL import Image

from dtrain.images import png_bytes
from dtrain.provenance import (
    TRAINED_ALGORITHMIC_MEDIA,
    ProvenanceError,
    ProvenanceSigner,
    generate_test_credentials,
    signer_for_serving,
    verify_png,
)

GEN = {"model": "tiny-dit", "version": 3, "stage": "distill",
       "lineage": {"parent": "tiny-dit:2", "teacher": "big-dit:7"}, "sampler": "ddim", "steps": 4,
       "guidance": 7.3, "seed": 2**40 + 1, "class_label": None, "watermark_key_id": "wm-0123abcd"}


def image(size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)


def chunks(png: bytes) -> list[tuple[bytes, int, int]]:
    """(type, offset of the data, data length) of every PNG chunk."""
    out, i = [], 8
    while i < len(png):
        (n,) = struct.unpack(">I", png[i:i + 4])
        out.append((png[i + 4:i + 8], i + 8, n))
        i += 12 + n
    return out


def with_chunk_data(png: bytes, kind: bytes, data: bytes) -> bytes:
    """`png` with the data of its `kind` chunk replaced, length and CRC fixed: still a well-formed PNG."""
    _, start, n = next(c for c in chunks(png) if c[0] == kind)
    new = struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return png[:start - 8] + new + png[start + n + 4:]


def chunk_data(png: bytes, kind: bytes) -> bytes:
    _, start, n = next(c for c in chunks(png) if c[0] == kind)
    return png[start:start + n]


def codes(statuses: list[dict]) -> set[str]:
    return {s["code"] for s in statuses}


@pytest.fixture(scope="module")
def creds(tmp_path_factory):
    return generate_test_credentials(tmp_path_factory.mktemp("c2pa"))


@pytest.fixture(scope="module")
def signer(creds):
    return ProvenanceSigner(*creds)


@pytest.fixture(scope="module")
def signed(signer):
    return signer.sign_png(png_bytes(image()), GEN, title="tiny-dit sample")


def test_a_signed_image_verifies_and_reads_back_its_generation_record(signed):
    result = verify_png(signed)
    assert result["valid"] and result["errors"] == [] and result["state"] == "Valid"
    assert result["generation"] == GEN  # nested dict, None, a 41-bit int and a float, exactly
    assert result["claim_generator_info"][0]["name"] == "dtrain"
    assert result["claim_generator_info"][0]["version"] == version("dtrain")
    assert result["signer"]["common_name"] == "dtrain test signer" and result["signer"]["alg"] == "Es256"
    # A self-made CA is reported as untrusted, which is not an integrity failure.
    assert not result["trusted"] and codes(result["trust"]) == {"signingCredential.untrusted"}
    # The pixels are untouched; the manifest sits in a caBX chunk before the image data.
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(signed))), image())
    assert [c[0] for c in chunks(signed)] == [b"IHDR", b"caBX", b"IDAT", b"IEND"]
    assert len(signed) < 8_000  # no JPEG thumbnail in the manifest (it made an 8x8 PNG 20 kB)

    with c2pa.Reader("image/png", io.BytesIO(signed)) as reader:
        manifest = reader.get_active_manifest()
    assert manifest["title"] == "tiny-dit sample"
    actions = next(a["data"]["actions"] for a in manifest["assertions"] if a["label"].startswith("c2pa.actions"))
    assert actions == [{"action": "c2pa.created", "digitalSourceType": TRAINED_ALGORITHMIC_MEDIA}]


def test_the_signer_is_trusted_only_against_its_own_ca(signed, creds, tmp_path):
    ca_pem = x509.load_pem_x509_certificates(creds[0].read_bytes())[1].public_bytes(serialization.Encoding.PEM)
    trusted = verify_png(signed, trust_anchors=ca_pem)
    assert trusted["valid"] and trusted["trusted"] and trusted["trust"] == [] and trusted["state"] == "Trusted"
    other_ca = x509.load_pem_x509_certificates(generate_test_credentials(tmp_path)[0].read_bytes())[1]
    stranger = verify_png(signed, trust_anchors=other_ca.public_bytes(serialization.Encoding.PEM).decode())
    assert stranger["valid"] and not stranger["trusted"]


def test_credentials_are_a_ca_signed_leaf_and_an_owner_only_key(creds):
    chain_path, key_path = creds
    leaf, ca = x509.load_pem_x509_certificates(chain_path.read_bytes())
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert leaf.issuer == ca.subject and leaf.issuer != leaf.subject
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert leaf.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
    assert ExtendedKeyUsageOID.EMAIL_PROTECTION in leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert leaf.not_valid_before_utc < dt.datetime.now(dt.timezone.utc) < leaf.not_valid_after_utc


def flip_idat_byte(signed: bytes) -> bytes:
    data = bytearray(chunk_data(signed, b"IDAT"))
    data[len(data) // 2] ^= 0x01
    return with_chunk_data(signed, b"IDAT", bytes(data))


def splice_one_pixel_change(signed: bytes) -> bytes:
    img = image()
    img[5, 7] ^= 0x01
    edited = with_chunk_data(signed, b"IDAT", chunk_data(png_bytes(img), b"IDAT"))
    assert np.asarray(Image.open(io.BytesIO(edited)))[5, 7] == img[5, 7]  # a valid PNG, one pixel off
    return edited


@pytest.mark.parametrize("tamper", [flip_idat_byte, splice_one_pixel_change])
def test_changing_the_image_data_fails_the_data_hash(signed, tamper):
    result = verify_png(tamper(signed))
    assert not result["valid"]
    assert codes(result["errors"]) == {"assertion.dataHash.mismatch"}
    assert result["generation"] == GEN  # the manifest itself is intact and still readable


def test_changing_the_generation_record_fails_its_assertion_hash(signed):
    manifest = chunk_data(signed, b"caBX")
    assert manifest.count(b"tiny-dit:2") == 1
    forged = with_chunk_data(signed, b"caBX", manifest.replace(b"tiny-dit:2", b"tiny-dit:9"))
    result = verify_png(forged)
    assert not result["valid"] and codes(result["errors"]) == {"assertion.hashedURI.mismatch"}
    assert result["generation"]["lineage"]["parent"] == "tiny-dit:9"  # readable, but not vouched for


def test_changing_the_signature_fails_the_claim_signature(signed):
    manifest = bytearray(chunk_data(signed, b"caBX"))
    manifest[-1] ^= 0x01  # the COSE signature closes the manifest store
    result = verify_png(with_chunk_data(signed, b"caBX", bytes(manifest)))
    assert not result["valid"] and codes(result["errors"]) == {"claimSignature.mismatch"}


def test_an_unsigned_or_unreadable_image_is_refused():
    with pytest.raises(ProvenanceError, match="carries no C2PA manifest"):
        verify_png(png_bytes(image(8)))
    with pytest.raises(ProvenanceError, match="cannot read"):
        verify_png(b"not a png at all")


def test_bad_credentials_are_refused_naming_the_file(creds, tmp_path):
    chain_path, key_path = creds
    junk = tmp_path / "junk.pem"
    junk.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    with pytest.raises(ProvenanceError, match="junk.pem: not a PEM certificate chain"):
        ProvenanceSigner(junk, key_path)
    with pytest.raises(ProvenanceError, match="junk.pem: not an unencrypted PEM private key"):
        ProvenanceSigner(chain_path, junk)
    with pytest.raises(ProvenanceError, match="cannot read .*missing.pem"):
        ProvenanceSigner(tmp_path / "missing.pem", key_path)
    _, other_key = generate_test_credentials(tmp_path / "other")
    with pytest.raises(ProvenanceError, match="other/c2pa-key.pem does not match"):
        ProvenanceSigner(chain_path, other_key)

    # A well-formed certificate that c2pa's profile rejects (self-signed) fails at construction.
    key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "self-signed")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
            .sign(key, hashes.SHA256()))
    selfsigned = tmp_path / "selfsigned.pem"
    selfsigned.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(ProvenanceError, match="selfsigned.pem .* c2pa refuses"):
        ProvenanceSigner(selfsigned, key_path)


def test_bad_inputs_to_sign_are_refused(signer):
    with pytest.raises(ProvenanceError, match="not JSON-serializable"):
        signer.sign_png(png_bytes(image(8)), {"seed": np.random.default_rng(0)})
    with pytest.raises(ProvenanceError, match="cannot sign"):
        signer.sign_png(b"not a png", GEN)


def test_the_signer_pickles_and_signs_from_many_threads(signer):
    blob = pickle.dumps(signer)
    copy = pickle.loads(blob)
    assert copy.alg == signer.alg and copy.cert_chain_pem == signer.cert_chain_pem
    pngs = [png_bytes(image(8, seed)) for seed in range(8)]
    with ThreadPoolExecutor(8) as pool:
        out = list(pool.map(lambda i: copy.sign_png(pngs[i], {**GEN, "seed": i}), range(8)))
    results = [verify_png(o) for o in out]
    assert all(r["valid"] for r in results)
    assert [r["generation"]["seed"] for r in results] == list(range(8))


def test_serving_makes_test_credentials_once_and_takes_given_ones_in_pairs(creds, tmp_path, monkeypatch):
    monkeypatch.setenv("DTRAIN_PROVENANCE_DIR", str(tmp_path / "c2pa-test"))
    first, test = signer_for_serving(None, None)
    again, _ = signer_for_serving(None, None)
    assert test and first.cert_chain_pem == again.cert_chain_pem  # made on first use, then reused
    given, test = signer_for_serving(*creds)
    assert not test and given.cert_chain_path == str(creds[0])
    with pytest.raises(ProvenanceError, match="both"):
        signer_for_serving(creds[0], None)


def test_dtrain_verify_prints_a_record_per_image_and_fails_on_a_changed_one(signed, tmp_path):
    import json

    from click.testing import CliRunner

    from dtrain.cli import main

    (tmp_path / "ok.png").write_bytes(signed)
    (tmp_path / "changed.png").write_bytes(flip_idat_byte(signed))
    (tmp_path / "plain.png").write_bytes(png_bytes(image()))
    ok = CliRunner().invoke(main, ["verify", str(tmp_path / "ok.png")])
    assert ok.exit_code == 0 and json.loads(ok.output)["generation"] == GEN, ok.output
    bad = CliRunner().invoke(main, ["verify", *(str(tmp_path / f) for f in ("ok.png", "changed.png", "plain.png"))])
    lines = [json.loads(line) for line in bad.output.splitlines()]
    assert bad.exit_code == 1 and [r["valid"] for r in lines] == [True, False, False], bad.output
    assert "no C2PA manifest" in lines[2]["errors"][0]["explanation"]
