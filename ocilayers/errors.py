"""The error hierarchy: one root, and a handful of kinds a caller can act on."""


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


class StoreError(OCILayersError):
    """The store is missing, corrupt, locked or asked for something it lacks."""
