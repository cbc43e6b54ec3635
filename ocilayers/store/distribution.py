"""What was pulled and pushed, as dockerd records it under `image/overlay2/distribution/`:
`diffid-by-digest/sha256/<blob hex>` holds a layer blob's DiffID, and
`v2metadata-by-diffid/sha256/<DiffID hex>` a JSON list of where that layer is known as a
compressed blob: `[{"Digest": ..., "SourceRepository": "HOST/REPO", "HMAC": ""}]`. A push
reads them to skip or mount what a registry already has (the store keeps no compressed
blob); a re-pull reads the manifest digest from `repositories.json` (`repo@sha256:...`)."""

from __future__ import annotations

import contextlib
import json
import os

from ocilayers.errors import StoreError
from ocilayers.fsutil import write_atomic
from ocilayers.spec import Digest
from ocilayers.store.layout import StoreLayout


class Distribution:
    def __init__(self, layout: StoreLayout) -> None:
        self.root = os.path.join(layout.image_root, "distribution")
        # ocilayers' own: a blob's media type (dockerd's records have none, and a push that
        # reuses a blob must name it in the manifest without reading the blob)
        self.media_root = os.path.join(layout.root, "ocilayers", "media-types", "sha256")

    def media_type_of(self, blob: Digest) -> str | None:
        try:
            with open(os.path.join(self.media_root, blob.hex), "rb") as f:
                return f.read(256).decode().strip() or None
        except (FileNotFoundError, UnicodeDecodeError):
            return None

    def _path(self, kind: str, digest: Digest) -> str:
        return os.path.join(self.root, kind, digest.algorithm, digest.hex)

    def diff_id_of(self, blob: Digest) -> Digest | None:
        try:
            with open(self._path("diffid-by-digest", blob), "rb") as f:
                return Digest.parse(f.read(200).decode().strip())
        except (FileNotFoundError, ValueError, UnicodeDecodeError):
            return None

    def blobs_of(self, diff_id: Digest) -> list[tuple[Digest, str]]:
        """(blob digest, HOST/REPO) where the layer `diff_id` is known, newest first."""
        try:
            with open(self._path("v2metadata-by-diffid", diff_id), "rb") as f:
                entries = json.loads(f.read(4 << 20))
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            raise StoreError(f"distribution metadata of {diff_id}: {exc}") from None
        out = []
        for e in entries if isinstance(entries, list) else []:
            with contextlib.suppress(KeyError, TypeError, ValueError):
                out.append((Digest.parse(e["Digest"]), str(e["SourceRepository"])))
        return out

    def record(self, diff_id: Digest, blob: Digest, repository: str,
               media_type: str | None = None) -> None:
        """Remember that `repository` (HOST/REPO) has the layer `diff_id` as `blob` (of
        `media_type`). Call under the store lock."""
        if media_type:
            os.makedirs(self.media_root, mode=0o700, exist_ok=True)
            write_atomic(os.path.join(self.media_root, blob.hex), media_type.encode(), 0o644)
        for kind in ("diffid-by-digest", "v2metadata-by-diffid"):
            os.makedirs(os.path.join(self.root, kind, "sha256"), mode=0o700, exist_ok=True)
        write_atomic(self._path("diffid-by-digest", blob), str(diff_id).encode(), 0o644)
        have = [(d, r) for d, r in self.blobs_of(diff_id) if (d, r) != (blob, repository)]
        entries = [{"Digest": str(blob), "SourceRepository": repository, "HMAC": ""}]
        entries += [{"Digest": str(d), "SourceRepository": r, "HMAC": ""} for d, r in have]
        write_atomic(self._path("v2metadata-by-diffid", diff_id),
                     json.dumps(entries[:50], separators=(",", ":")).encode(), 0o644)
