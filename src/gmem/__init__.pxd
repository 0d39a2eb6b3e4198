# The C-level API of gmem for `cimport gmem` (see gmem/_core.pxd for the declarations
# and their documentation; GMEM_CAPI_VERSION there is bumped on incompatible changes).
from gmem._core cimport *
