"""Signed C2PA provenance for the PNG images the server generates.

A C2PA manifest embedded in the PNG (a `caBX` chunk) says, under a signature, that dtrain
created the image with a trained model (`c2pa.created`, IPTC `trainedAlgorithmicMedia`) and
records how (`org.dtrain.generation`: model, stage, lineage, sampler, seed, and what the image was
conditioned on: a class model's `class_label`, or a text model's `prompt` and any `negative_prompt`,
or the `regions` (background and objects in their boxes) and `region_method` of region control,
which thus travel with the image to whoever receives it). An edited image (POST /v1/edit) records
`c2pa.opened` of its parent ingredient, the image it was made from (as sent: a dtrain image's own
manifest travels inside it), then `c2pa.edited`, and the edit's parameters under `edit`. The manifest
hashes the image bytes, so any later change to the pixels or to the manifest is detectable by
anyone with a C2PA reader, unlike the invisible watermark, which survives edits but proves nothing.

No timestamp authority is used (the serving cluster has no network egress), so a verifier
checks the certificate's validity period against the current time: images signed with a
certificate that has since expired verify as invalid (`claimSignature.outsideValidity`).
"""
from __future__ import annotations

import datetime as dt
import io
import json
import os
import struct
import zlib
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import c2pa
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from dtrain.errors import DtrainError

GENERATION_LABEL = "org.dtrain.generation"
TRAINED_ALGORITHMIC_MEDIA = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"

# Failure codes that only say "this certificate does not chain to a trust anchor we were given".
# The manifest and the image are still intact, so they go to `trust`, not `errors`: a self-made CA
# (the test credentials, a company-internal CA) is never on the C2PA trust list.
UNTRUSTED_CODES = frozenset({"signingCredential.untrusted", "timeStamp.untrusted"})

# A reader that never goes to the network: no remote manifests, no OCSP.
_READ_SETTINGS: dict[str, Any] = {"verify": {"remote_manifest_fetch": False, "ocsp_fetch": False}}
# A JPEG thumbnail of a 32x32 image would be far bigger than the image itself.
_SIGN_SETTINGS: dict[str, Any] = {"builder": {"thumbnail": {"enabled": False}}}


CREDENTIALS_DIR_ENV = "DTRAIN_PROVENANCE_DIR"  # default test credentials, if not ~/.config/dtrain/c2pa-test


class ProvenanceError(DtrainError, ValueError):
    """Bad credentials, an image without a manifest, or a manifest that cannot be parsed."""


@dataclass(frozen=True)
class Ingredient:
    """The image a signed one was made from: its file (`data`, as received) and type (`mime`: image/png,
    image/jpeg). `fallback`: the same pixels as a plain PNG, recorded instead (its description says so)
    when c2pa cannot read the file's own C2PA data (a damaged manifest): the edit is still signed."""
    data: bytes
    mime: str
    title: str = "source image"
    fallback: bytes | None = None


def _dtrain_version() -> str:
    try:
        return version("dtrain")
    except PackageNotFoundError:
        return "dev"


def _signing_alg(key: Any) -> c2pa.C2paSigningAlg:
    """c2pa needs the algorithm spelled out; it follows from the key."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        algs = {"secp256r1": c2pa.C2paSigningAlg.ES256, "secp384r1": c2pa.C2paSigningAlg.ES384,
                "secp521r1": c2pa.C2paSigningAlg.ES512}
        if key.curve.name in algs:
            return algs[key.curve.name]
    elif isinstance(key, ed25519.Ed25519PrivateKey):
        return c2pa.C2paSigningAlg.ED25519
    elif isinstance(key, rsa.RSAPrivateKey):
        return c2pa.C2paSigningAlg.PS256  # C2PA allows RSA only with PSS padding
    raise ProvenanceError(f"unsupported key type {type(key).__name__} "
                          "(use EC P-256/P-384/P-521, Ed25519 or RSA)")


def _tiny_png() -> bytes:
    """A 1x1 grey PNG, to trial-sign with at construction (no Pillow/torch import needed)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00\x80")) + chunk(b"IEND", b""))


class ProvenanceSigner:
    """Embeds a signed C2PA manifest in PNG bytes.

    Holds only the PEM bytes (so it pickles: Ray ships it to the Serve replicas, private key
    included) and builds the c2pa objects afresh on every call: they are single-use (a Builder
    closes after signing) and cost about a millisecond, which keeps `sign_png` safe to call
    from several `asyncio.to_thread` workers at once.
    """

    def __init__(self, cert_chain_path: str | Path, key_path: str | Path) -> None:
        """Load and check the credentials now, so a bad file fails at startup, not per request.

        `cert_chain_path`: PEM certificates, end-entity first, then its CA(s).
        `key_path`: the end-entity's unencrypted PEM private key.
        """
        self.cert_chain_path, self.key_path = str(cert_chain_path), str(key_path)
        self.cert_chain_pem = self._read(self.cert_chain_path)
        self.key_pem = self._read(self.key_path)
        try:
            certs = x509.load_pem_x509_certificates(self.cert_chain_pem)
        except ValueError as e:
            raise ProvenanceError(f"{self.cert_chain_path}: not a PEM certificate chain ({e})") from e
        try:
            key = serialization.load_pem_private_key(self.key_pem, password=None)
        except (ValueError, TypeError) as e:
            raise ProvenanceError(f"{self.key_path}: not an unencrypted PEM private key ({e})") from e
        if certs[0].public_key().public_bytes(serialization.Encoding.DER,
                                              serialization.PublicFormat.SubjectPublicKeyInfo) != \
                key.public_key().public_bytes(serialization.Encoding.DER,
                                              serialization.PublicFormat.SubjectPublicKeyInfo):
            raise ProvenanceError(f"{self.key_path} does not match the first certificate "
                                  f"of {self.cert_chain_path} (the chain must start with the signer)")
        self.alg = _signing_alg(key)
        try:  # c2pa's certificate profile (EKU, AKI, not self-signed, validity) is checked at signing
            self._sign(_tiny_png(), {}, "credential check")
        except c2pa.C2paError as e:
            raise ProvenanceError(f"{self.cert_chain_path} / {self.key_path}: "
                                  f"c2pa refuses to sign with these credentials: {e}") from e

    @staticmethod
    def _read(path: str) -> bytes:
        try:
            return Path(path).read_bytes()
        except OSError as e:
            raise ProvenanceError(f"cannot read {path}: {e.strerror}") from e

    def sign_png(self, png: bytes, generation: dict[str, Any], title: str = "dtrain image",
                 parent: Ingredient | None = None) -> bytes:
        """Return `png` with an embedded manifest that signs its bytes and `generation`: created by dtrain,
        or with a `parent`, edited by dtrain from that image (c2pa.opened, then c2pa.edited)."""
        try:
            json.dumps(generation)
        except (TypeError, ValueError) as e:
            raise ProvenanceError(f"generation metadata is not JSON-serializable: {e}") from e
        numbers = _number_array(generation, "generation")
        if numbers:  # c2pa (0.38) reads a JSON array of numbers as bytes: [0.0, 0.5] comes back "", [300, 1] "LAE="
            raise ProvenanceError(f"{numbers} is an array of numbers, which C2PA would store as bytes (changed or "
                                  "lost): record it as an object of named numbers")
        try:
            return self._sign(png, generation, title, parent)
        except c2pa.C2paError as e:
            raise ProvenanceError(f"cannot sign the image: {e}") from e

    def _sign(self, png: bytes, generation: dict[str, Any], title: str, parent: Ingredient | None = None) -> bytes:
        actions = ([{"action": "c2pa.created", "digitalSourceType": TRAINED_ALGORITHMIC_MEDIA}] if parent is None else
                   [{"action": "c2pa.opened", "parameters": {"ingredientIds": [_PARENT_ID]}},  # C2PA 2: opened first
                    {"action": "c2pa.edited", "digitalSourceType": TRAINED_ALGORITHMIC_MEDIA,
                     "description": "regenerated by a trained model from the image's inverted noise"}])
        manifest = {
            "claim_generator_info": [{"name": "dtrain", "version": _dtrain_version()}],
            "title": title,
            "assertions": [
                {"label": "c2pa.actions", "data": {"actions": actions}},
                {"label": GENERATION_LABEL, "data": generation},
            ],
        }
        info = c2pa.C2paSignerInfo(self.alg, self.cert_chain_pem, self.key_pem, None)
        with c2pa.Signer.from_info(info) as signer, \
                c2pa.Context.from_dict(_SIGN_SETTINGS) as context, \
                c2pa.Builder(manifest, context=context) as builder:
            if parent is not None:
                _add_parent(builder, parent)
            out = io.BytesIO()
            builder.sign(signer, "image/png", io.BytesIO(png), out)
        return out.getvalue()


_PARENT_ID = "parent"


def _add_parent(builder: c2pa.Builder, parent: Ingredient) -> None:
    """The image an edit was made from, as the builder's parentOf ingredient: the file as received (c2pa
    reads its format and any manifest of its own), else its `fallback` PNG when c2pa cannot read the file."""
    ingredient = {"title": parent.title, "relationship": "parentOf", "instance_id": _PARENT_ID}
    try:
        builder.add_ingredient(ingredient, parent.mime, io.BytesIO(parent.data))
    except c2pa.C2paError:
        if parent.fallback is None:
            raise
        builder.add_ingredient({**ingredient, "description": "its pixels re-encoded as PNG: the file sent carried "
                                "C2PA data that could not be read"}, "image/png", io.BytesIO(parent.fallback))


def _number_array(data: Any, path: str) -> str | None:
    """The path of the first non-empty array of numbers only in JSON-like `data`, or None."""
    if isinstance(data, dict):
        return next((p for k, v in data.items() if (p := _number_array(v, f"{path}.{k}"))), None)
    if isinstance(data, (list, tuple)):
        if data and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in data):
            return path
        return next((p for i, v in enumerate(data) if (p := _number_array(v, f"{path}[{i}]"))), None)
    return None


def verify_png(png: bytes, trust_anchors: str | bytes | None = None) -> dict[str, Any]:
    """Check a PNG's embedded C2PA manifest: is it intact, who signed it, how was it generated.

    Returns `valid` (no integrity or signature failure: every status code except the
    trust-list ones in UNTRUSTED_CODES, which go to `trust`), `trusted` (the signer chains to
    one of `trust_anchors`, PEM CA certificates), `errors` and `trust` (c2pa status entries:
    code, explanation, url), `state` (c2pa's own verdict), `generation` (the
    org.dtrain.generation data or None), `actions` (the c2pa.actions names, in order),
    `ingredients` (title, format, relationship, description, and whether it carries a manifest
    of its own), `claim_generator_info` and `signer` (issuer, common_name, alg,
    cert_serial_number).
    """
    settings = json.loads(json.dumps(_READ_SETTINGS))
    if trust_anchors is not None:
        settings["trust"] = {"trust_anchors": trust_anchors.decode() if isinstance(trust_anchors, bytes)
                             else trust_anchors}
    try:
        with c2pa.Context.from_dict(settings) as context, \
                c2pa.Reader("image/png", io.BytesIO(png), context=context) as reader:
            store = json.loads(reader.json())
    except c2pa.C2paError.ManifestNotFound as e:
        raise ProvenanceError("the image carries no C2PA manifest (unsigned, or stripped "
                              "by re-encoding)") from e
    except c2pa.C2paError as e:
        raise ProvenanceError(f"cannot read the image's C2PA manifest: {e}") from e

    manifest = store.get("manifests", {}).get(store.get("active_manifest"))
    if manifest is None:
        raise ProvenanceError("invalid C2PA manifest store: no active manifest")
    # validation_status lists the failures; validation_results splits them per manifest.
    results = store.get("validation_results") or {}
    failures = list(store.get("validation_status") or [])
    failures += (results.get("activeManifest") or {}).get("failure", [])
    for delta in results.get("ingredientDeltas") or []:
        failures += (delta.get("validationDeltas") or {}).get("failure", [])
    unique = list({(f.get("code"), f.get("url")): f for f in failures}.values())
    errors = [f for f in unique if f.get("code") not in UNTRUSTED_CODES]
    generation = next((a.get("data") for a in manifest.get("assertions", [])
                       if a.get("label") == GENERATION_LABEL), None)
    actions = [a.get("action") for assertion in manifest.get("assertions", [])
               if str(assertion.get("label", "")).startswith("c2pa.actions")
               for a in (assertion.get("data") or {}).get("actions", [])]
    ingredients = [{"title": i.get("title"), "format": i.get("format"), "relationship": i.get("relationship"),
                    "description": i.get("description"), "has_manifest": i.get("active_manifest") is not None}
                   for i in manifest.get("ingredients", [])]
    return {
        "valid": not errors,
        "trusted": store.get("validation_state") == "Trusted",
        "state": store.get("validation_state"),
        "errors": errors,
        "trust": [f for f in unique if f.get("code") in UNTRUSTED_CODES],
        "generation": generation,
        "actions": actions,
        "ingredients": ingredients,
        "claim_generator_info": manifest.get("claim_generator_info", []),
        "signer": manifest.get("signature_info", {}),
    }


def generate_test_credentials(directory: str | Path, days: int = 365) -> tuple[Path, Path]:
    """Write a throwaway CA + signing certificate (`c2pa-chain.pem`) and key (`c2pa-key.pem`).

    FOR TESTING: images signed with these prove their integrity (nothing changed since
    signing), not who made them: anyone can make such a CA. The CA key is discarded, so the
    CA vouches for this one certificate only. The certificate satisfies c2pa-rs's profile
    checks: keyUsage digitalSignature, extendedKeyUsage emailProtection (c2pa-rs rejects
    documentSigning as missing the required EKU), an authority key identifier, not a CA,
    not self-signed, valid from an hour ago for `days` days.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)

    def name(common_name: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "dtrain test credentials"),
                          x509.NameAttribute(NameOID.COMMON_NAME, common_name)])

    def usage(**on: bool) -> x509.KeyUsage:
        flags = dict.fromkeys(["digital_signature", "content_commitment", "key_encipherment",
                               "data_encipherment", "key_agreement", "key_cert_sign", "crl_sign",
                               "encipher_only", "decipher_only"], False)
        return x509.KeyUsage(**{**flags, **on})

    def builder(subject: x509.Name, issuer: x509.Name, public_key: Any) -> x509.CertificateBuilder:
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
                .public_key(public_key).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(hours=1))
                .not_valid_after(now + dt.timedelta(days=days))
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = name("dtrain test CA (not trusted)")
    ca = (builder(ca_name, ca_name, ca_key.public_key())
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(usage(key_cert_sign=True, crl_sign=True), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (builder(name("dtrain test signer"), ca_name, key.public_key())
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(usage(digital_signature=True), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))

    chain_path, key_path = directory / "c2pa-chain.pem", directory / "c2pa-key.pem"
    chain_path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (cert, ca)))
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(fd, 0o600)  # O_CREAT's mode does not apply to an existing file
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return chain_path, key_path


def signer_for_serving(cert_chain: str | Path | None, key: str | Path | None) -> tuple[ProvenanceSigner, bool]:
    """The deployment's signer and whether its credentials are the test ones: the given certificate
    chain and key, or test credentials in $DTRAIN_PROVENANCE_DIR (default ~/.config/dtrain/c2pa-test),
    made on first use (they prove an image unchanged, not who made it)."""
    if (cert_chain is None) != (key is None):
        raise ProvenanceError("give both a provenance certificate chain and its key, or neither (test credentials)")
    if cert_chain is not None:
        return ProvenanceSigner(cert_chain, key), False
    directory = Path(os.environ.get(CREDENTIALS_DIR_ENV) or Path.home() / ".config" / "dtrain" / "c2pa-test")
    chain, key_file = directory / "c2pa-chain.pem", directory / "c2pa-key.pem"
    if not (chain.exists() and key_file.exists()):
        generate_test_credentials(directory)
    try:
        return ProvenanceSigner(chain, key_file), True
    except ProvenanceError:  # expired (they last a year): make new ones
        return ProvenanceSigner(*generate_test_credentials(directory)), True
