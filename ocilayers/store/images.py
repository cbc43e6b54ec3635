"""Images in the store: configs in `imagedb/`, tags in `repositories.json`, lookup by name."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

from ocilayers.errors import ImageError, ImageNotFoundError, OCILayersError, StoreError
from ocilayers.fsutil import rmtree, write_atomic
from ocilayers.spec import Digest, ImageConfig, chain_ids, normalize_reference, split_reference
from ocilayers.store.layers import LayerRecord, LayerStore
from ocilayers.store.layout import StoreLayout


@dataclass(frozen=True)
class StoreImage:
    image_id: Digest
    config: ImageConfig
    tags: tuple[str, ...]
    layers: tuple[LayerRecord, ...]

    @property
    def top(self) -> LayerRecord | None:
        return self.layers[-1] if self.layers else None


def parse_config(raw: bytes, image_id: Digest | None = None) -> ImageConfig:
    """A stored config; a config that does not parse is store corruption, not a bad image."""
    what = f"image {image_id.short}" if image_id is not None else "image config"
    try:
        return ImageConfig.parse(raw, what)
    except (ImageError, RecursionError) as exc:
        raise StoreError(f"image config is corrupt: {type(exc).__name__}: {exc}") from None


def top_chain(config: ImageConfig) -> Digest | None:
    """The ChainID of an image's top layer (None for an image with no layers)."""
    try:
        chains = chain_ids(config.diff_ids)
    except OCILayersError as exc:
        raise StoreError(f"image config is corrupt: {exc}") from None
    return chains[-1] if chains else None


class ImageStore:
    """`imagedb/content`, `imagedb/metadata` and `repositories.json`."""

    def __init__(self, layout: StoreLayout) -> None:
        self.layout = layout

    # -- configs --

    def put(self, config_raw: bytes) -> Digest:
        image_id = Digest.of_bytes(config_raw)
        path = self.layout.image_content(image_id)
        if not os.path.exists(path):
            write_atomic(path, config_raw, 0o600)
        return image_id

    def add(self, config_raw: bytes, parent: Digest | None, tags: Sequence[str]) -> Digest:
        """A new image built here (commit, squash): its config, its metadata (`parent`,
        `lastUpdated`, as dockerd writes for a commit) and its tags. Call under the lock."""
        from ocilayers.spec import now_rfc3339

        image_id = self.put(config_raw)
        meta = self.layout.image_metadata(image_id)
        os.makedirs(meta, mode=0o700, exist_ok=True)
        if parent is not None:
            write_atomic(os.path.join(meta, "parent"), str(parent).encode(), 0o600)
        write_atomic(os.path.join(meta, "lastUpdated"), now_rfc3339().encode(), 0o600)
        for t in tags:
            self.set_tag(t, image_id)
        return image_id

    def config_bytes(self, image_id: Digest) -> bytes:
        try:
            with open(self.layout.image_content(image_id), "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise StoreError(f"image {image_id} is not in the store") from None

    def config(self, image_id: Digest) -> ImageConfig:
        return parse_config(self.config_bytes(image_id), image_id)

    def ids(self) -> list[Digest]:
        base = os.path.join(self.layout.imagedb, "content", "sha256")
        with contextlib.suppress(FileNotFoundError):
            return [Digest("sha256", n) for n in sorted(os.listdir(base))
                    if not n.startswith(".")]
        return []

    def remove(self, image_id: Digest) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.layout.image_content(image_id))
        with contextlib.suppress(FileNotFoundError):
            rmtree(self.layout.image_metadata(image_id))

    # -- tags --

    def repositories(self) -> dict[str, dict[str, str]]:
        path = self.layout.repositories_path
        try:
            with open(path, "rb") as f:
                obj = json.loads(f.read())
        except FileNotFoundError:
            return {}
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise StoreError(f"{path}: corrupt: {exc}") from None
        repos = obj.get("Repositories") if isinstance(obj, dict) else None
        if not isinstance(repos, dict):
            raise StoreError(f"{path}: no Repositories object")
        return repos

    def _write_repositories(self, repos: dict[str, dict[str, str]]) -> None:
        repos = {k: v for k, v in repos.items() if v}
        data = json.dumps({"Repositories": repos}, sort_keys=True, separators=(",", ":"))
        write_atomic(self.layout.repositories_path, data.encode(), 0o600)

    def tags(self) -> dict[str, Digest]:
        """Normalised `repo:tag` -> image ID."""
        out = {}
        for refs in self.repositories().values():
            for ref, image_id in refs.items():
                out[ref] = Digest.parse(image_id)
        return out

    def tags_of(self, image_id: Digest) -> tuple[str, ...]:
        return tuple(sorted(t for t, i in self.tags().items() if i == image_id))

    def set_tag(self, ref: str, image_id: Digest) -> str:
        repo, norm = split_reference(ref)
        repos = self.repositories()
        if repos.get(repo, {}).get(norm) != str(image_id):
            repos.setdefault(repo, {})[norm] = str(image_id)
            self._write_repositories(repos)
        return norm

    def remove_tag(self, ref: str) -> Digest:
        repo, norm = split_reference(ref)
        repos = self.repositories()
        if norm not in repos.get(repo, {}):
            raise StoreError(f"no such tag: {norm}")
        image_id = Digest.parse(repos[repo].pop(norm))
        self._write_repositories(repos)
        return image_id

    # -- lookup --

    def find(self, name: str) -> Digest:
        """A tag, an image ID (`sha256:<hex>` or hex), or a unique ID prefix."""
        tags = self.tags()
        with contextlib.suppress(ImageError):
            norm = normalize_reference(name)
            if norm in tags:
                return tags[norm]
        hexpart = name.split(":", 1)[1] if name.startswith("sha256:") else name
        if hexpart and all(c in "0123456789abcdef" for c in hexpart):
            matches = [i for i in self.ids() if i.hex.startswith(hexpart)]
            if len(matches) == 1:
                return matches[0]
            if len(matches) > 1:
                raise StoreError(f"image ID prefix {name!r} is ambiguous")
        raise ImageNotFoundError(f"no such image in the store: {name}")

    def load(self, image_id: Digest, layers: LayerStore) -> StoreImage:
        """The image's config, tags and chain of layer records (base first)."""
        config = ImageConfig.parse(self.config_bytes(image_id), f"image {image_id.short}")
        top = top_chain(config)
        chain = tuple(layers.chain(top)) if top is not None else ()
        return StoreImage(image_id, config, self.tags_of(image_id), chain)
