"""Every error class ocilayers raises on purpose: one root, and the kinds a caller can act on.

    OCILayersError
    ├── ImageError (also ValueError): an image or its source is malformed or unsupported
    │   ├── BlobNotFoundError, DigestMismatchError, RefError
    │   ├── UnsafeEntryError: a layer entry would escape its target or forge overlay metadata
    │   └── TarError: a layer is not a well-formed tar
    ├── ChangeError (also ValueError): a `--change` instruction cannot be applied
    ├── UpperDirError (also ValueError): a local upper dir or tree cannot be packed as asked
    │   └── UnsupportedUpperError: the upper dir alone is not the diff (redirect, metacopy)
    ├── StoreError: the store is missing, corrupt, locked or lacks what was asked
    │   ├── ImageNotFoundError: no tag, ID or ID prefix matches
    │   └── ChangedError: a diff dir no longer matches its tar-split records
    ├── MountError: a mount or unmount cannot be done (target, layer dir, or the kernel's errno)
    └── RunError: a step cannot be run as asked (no command, unknown user, no runtime)
"""


class OCILayersError(Exception):
    """Root of every error ocilayers raises on purpose."""


class ImageError(OCILayersError, ValueError):
    """The image (or its source) is malformed, inconsistent or unsupported."""


class BlobNotFoundError(ImageError):
    """A descriptor names a blob the source does not hold."""


class DigestMismatchError(ImageError):
    """A blob's digest or size is not what its descriptor says."""


class RefError(ImageError):
    """No image, or more than one, matches the requested ref/platform."""


class UnsafeEntryError(ImageError):
    """A layer entry would escape its target or forge overlay metadata."""


class TarError(ImageError):
    """The layer is not a well-formed tar archive."""


class ChangeError(OCILayersError, ValueError):
    """A config change (`--change INSTRUCTION`) cannot be applied: an instruction that is not
    allowed, bad syntax, a JSON array of non-strings, or a bad duration, port, signal or path."""


class UpperDirError(OCILayersError, ValueError):
    """A local upper dir, lower dir or tree cannot be packed as asked (it changed while it was
    read, holds a name no layer can carry, is not a directory, ...)."""


class UnsupportedUpperError(UpperDirError):
    """The upper dir alone is not the diff (redirect/metacopy) and no lowers were given."""


class StoreError(OCILayersError):
    """The store is missing, corrupt, locked or asked for something it lacks."""


class ImageNotFoundError(StoreError):
    """No tag, ID or ID prefix in the store matches."""


class ChangedError(StoreError):
    """A diff dir no longer matches its tar-split records."""


class MountError(OCILayersError):
    """A mount or unmount cannot be done: the target is missing, busy or not ours, a layer
    dir is missing, or the kernel refused (with its errno)."""


class RunError(OCILayersError):
    """A step cannot be run as asked: no command, an unknown user, no runtime, not root."""


class RootlessError(OCILayersError):
    """Rootless mode cannot work here: a missing tool, ID range or kernel feature."""
