"""What a study's numbers depend on, recorded once and checked on every resume.

A trial's score is only comparable with another's, and a ratio to the paragon only
meaningful, when both were measured on the same images, the same split, with the same
preprocessing, against the same gallery model, trained toward it with the same loss and
scored by the same protocol. :class:`Fingerprint` names each of those parts with a
readable description that ends in a content hash:

* ``data``: the data set's name, size, classes, channels and the SHA-256 of its images and labels;
* ``split``: the sizes of train, val, query and gallery and the SHA-256 of their index arrays;
* ``loss``: the compatibility loss and its options;
* ``protocol``: how val and query are scored (protocol, what val is searched against, whether
  query and gallery are one set, the metrics' version);
* ``preprocessing``: how images are resized, cropped and normalised on both sides;
* ``gallery``: the gallery model, the SHA-256 of its weights, its resolution and embedding width;
* ``unlabeled`` (only with ``data.unlabeled``): how many images it adds and the SHA-256 of their content.

The study stores the parts (``fingerprint`` user attribute) with the paragon, and every
finished trial stores the fingerprint's digest it was scored under. Resuming a study with
any part changed is refused with the parts named (:func:`check_fingerprint`); the user asks
for a new study by naming one (``--study-name``). The first four parts are known before the
gallery model is loaded or trained, so a changed data setting is refused before any
gallery work (:func:`early_parts`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import optuna

from nas.data import ImageSet, ImageSource, Preprocessing, Split
from nas.errors import ConfigError

__all__ = ["Fingerprint", "METRICS_VERSION", "early_parts", "full_parts", "check_fingerprint", "recorded_fingerprint", "ATTR"]

#: raised when the way val and query are scored changes (nas.metrics / nas.scoring), so older studies are refused
METRICS_VERSION = "1"
ATTR = "fingerprint"  # the study's user attribute: {part: description}
EARLY = ("data", "split", "loss", "protocol")
#: parts recorded only when set, with what a study that did not record one had: a study recorded without
#: ``data.unlabeled`` is refused when resumed with it, and the other way round
OPTIONAL = {"unlabeled": "none"}


@dataclass(frozen=True)
class Fingerprint:
    """The parts a study's numbers depend on (``{part: description}``) and their digest."""

    parts: Mapping[str, str]

    @property
    def digest(self) -> str:
        """The first 16 hex digits of the SHA-256 of the parts: what each stored score carries."""
        return hashlib.sha256(json.dumps(dict(sorted(self.parts.items()))).encode()).hexdigest()[:16]

    def differences(self, recorded: Mapping[str, str]) -> list[str]:
        """Each part that is recorded and now differs, as ``part: recorded -> now`` (parts not recorded are not compared, but
        an :data:`OPTIONAL` one not recorded was unset)."""
        names = [*self.parts, *(name for name in OPTIONAL if name in recorded and name not in self.parts)]
        changed = []
        for name in names:
            if name not in recorded and name not in OPTIONAL:
                continue
            before, now = recorded.get(name, OPTIONAL.get(name)), self.parts.get(name, OPTIONAL.get(name))
            if before != now:
                changed.append(f"{name}: recorded {before!r}, now {now!r}")
        return changed


def _sha(text: str) -> str:
    return text[:12]


def early_parts(data: ImageSet, split: Split, protocol: str, loss_name: str, loss_options: Mapping[str, Any],
                unlabeled: ImageSource | None = None) -> Fingerprint:
    """The parts known before the gallery model is loaded: data, split, loss and protocol (and ``unlabeled``'s images when given)."""
    sizes = split.sizes()
    extra = {} if unlabeled is None else {"unlabeled": f"{len(unlabeled)} images, sha256 {_sha(unlabeled.fingerprint())}"}
    return Fingerprint({
        "data": f"{data.name}: {len(data.labels)} images, {len(data.classes)} classes, {data.channels} channel(s), "
                f"sha256 {_sha(data.fingerprint())}",
        "split": f"train {sizes['train']}, val {sizes['val']}, query {sizes['query']}, gallery {sizes['gallery']}, "
                 f"sha256 {_sha(split.fingerprint())}",
        "loss": f"{loss_name} {json.dumps(dict(loss_options or {}), sort_keys=True)}",
        "protocol": f"{protocol}; val against {split.val_against}; query {'is' if split.query_is_gallery else 'is not'} the gallery; "
                    f"metrics v{METRICS_VERSION}",
        **extra,
    })


def full_parts(early: Fingerprint, preprocessing: Preprocessing, gallery_model: str, gallery_sha: str, resolution: int,
               embed_dim: int) -> Fingerprint:
    """``early`` with the gallery side: preprocessing and the gallery model's weights, resolution and embedding width."""
    return Fingerprint({
        **early.parts,
        "preprocessing": preprocessing.describe(),
        "gallery": f"{gallery_model} weights sha256 {_sha(gallery_sha)} at {resolution} px, {embed_dim}-d embeddings",
    })


def recorded_fingerprint(study: optuna.Study) -> dict[str, str] | None:
    """The parts the study recorded, or None (a study from before fingerprints were recorded, or a new one)."""
    parts = study.user_attrs.get(ATTR)
    return dict(parts) if isinstance(parts, Mapping) else None


def check_fingerprint(study_name: str, recorded: Mapping[str, str] | None, now: Fingerprint) -> None:
    """Refuse to go on with a study whose recorded parts differ from ``now``, naming every changed part."""
    if not recorded:
        return
    changed = now.differences(recorded)
    if changed:
        raise ConfigError(
            f"Study {study_name!r} was measured under other settings than this run's, so its paragon and trial scores "
            f"would not be comparable with new ones. Changed: " + "; ".join(changed) + ". Restore the study's settings "
            f"(its config is in the study, `nas results --study-name {study_name}`) or start a new study with --study-name NEW."
        )
