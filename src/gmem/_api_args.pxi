# Arguments from Python to C, in one place: each converter gives the C value or raises
# TypeError (not an integer / not bytes) or ValueError (out of range), never OverflowError;
# _err builds the OSError a refused call raises.

import errno as _errno_mod

_U64_MAX = (1 << 64) - 1
_U32 = 0xFFFFFFFF
_VALUE_MAX = (1 << 63) - 1


cdef extern from "Python.h":
    # raw: (unsigned long long)-1 with OverflowError set for a negative or too large int
    unsigned long long _PyLong_AsU64 "PyLong_AsUnsignedLongLong"(object o)
    void *PyErr_Occurred()          # borrowed, NULL if none
    void PyErr_Clear()


cdef uint64_t _u64(object x, str what) except? 0:
    """An index/pfn argument: a Python int in [0, 2**64)."""
    cdef uint64_t v
    if type(x) is int:              # the scalar fault path's case: one C conversion
        v = _PyLong_AsU64(x)
        if v != <uint64_t>-1 or PyErr_Occurred() == NULL:
            return v
        PyErr_Clear()
        raise ValueError(f"{what} {x} is outside [0, 2**64)")
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
        raise TypeError(f"{what} must be an integer, not {type(x).__name__}")
    x = int(x)
    if x < 0 or x > _U64_MAX:
        raise ValueError(f"{what} {x} is outside [0, 2**64)")
    return <uint64_t>x


cdef int _order_arg(object order, int max_order) except -1:
    if isinstance(order, bool) or not isinstance(order, (int, np.integer)):
        raise TypeError(f"order must be an integer, not {type(order).__name__}")
    if order < 0 or order > max_order:
        raise ValueError(f"order {order} is outside [0, {max_order}]")
    return <int>order


cdef int _mark_arg(object mark) except -2:
    if mark is None:
        return XA_NO_MARK
    if isinstance(mark, bool) or not isinstance(mark, (int, np.integer)) or not 0 <= mark < XA_MAX_MARKS:
        raise ValueError(f"mark must be 0, 1 or 2 (XA_MARK_0..2), not {mark!r}")
    return <int>mark


cdef uint64_t _u64_wrap(object x, str what) except? 0:
    """A __u64 ioctl field: Python ints wrap as C would (-1 -> 2**64 - 1)."""
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
        raise TypeError(f"{what} must be an integer, not {type(x).__name__}")
    x = int(x)
    if x < -(1 << 63) or x >= (1 << 64):
        raise ValueError(f"{what} {x} does not fit in 64 bits")
    return <uint64_t>(x & 0xFFFFFFFFFFFFFFFF)


cdef uint32_t _u32_wrap(object x, str what) except? 0:
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
        raise TypeError(f"{what} must be an integer, not {type(x).__name__}")
    x = int(x)
    if x < -(1 << 31) or x >= (1 << 32):
        raise ValueError(f"{what} {x} does not fit in 32 bits")
    return <uint32_t>(x & _U32)


cdef object _int_arg(object x, str what, object lo, object hi):
    """An integer argument in [lo, hi) (None: unbounded): TypeError for anything but an int
    (floats, strings, bools), ValueError outside the range -- never an OverflowError from a C
    conversion."""
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
        raise TypeError(f"{what} must be an integer, not {type(x).__name__}")
    x = int(x)
    if (lo is not None and x < lo) or (hi is not None and x >= hi):
        raise ValueError(f"{what} {x} is outside [{lo}, {hi})")
    return x


cdef inline object _c_int_arg(object x, str what):
    return _int_arg(x, what, -(1 << 31), 1 << 31)


cdef bytes _bytes_arg(object data, str what):
    """Bytes-like data or an iterable of byte values; an int is refused (bytes(n) would be
    n zero bytes, and an OverflowError for n >= 2**63)."""
    if isinstance(data, (int, np.integer)):
        raise TypeError(f"{what} must be bytes-like or an iterable of ints, not {type(data).__name__}")
    return bytes(data)


cdef inline uint64_t _buffer_len(object n, str what) except? 0:
    """A length of bytes to return: a Python object cannot be 2**63 bytes or more."""
    cdef uint64_t ln = _u64(n, what)
    if ln >= (<uint64_t>1) << 63:
        raise ValueError(f"{what} {ln} is larger than any buffer")
    return ln


cdef inline int64_t _s64(uint64_t x) noexcept nogil:
    return <int64_t>x


cdef int _vm_type_arg(object t) except -1:
    if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
        raise TypeError(f"vm_type must be an integer, not {type(t).__name__}")
    if not 0 <= t < KVM_MAX_VM_TYPES:
        raise ValueError(f"vm_type {t} is outside [0, {KVM_MAX_VM_TYPES})")
    return <int>t


cdef object _u64_array(object a, str what):
    try:
        arr = np.asarray(a)
    except OverflowError:
        # numpy converts an int subclass through its __index__, which may say 2**70
        raise ValueError(f"{what} holds a number outside 64 bits") from None
    if arr.ndim != 1:
        raise ValueError(f"{what} must be 1-D, not {arr.ndim}-D")
    if arr.size == 0:
        return np.zeros(0, dtype=np.uint64)         # [] is float64 to numpy: nothing to check
    if arr.dtype.kind not in "ui":
        raise TypeError(f"{what} must hold integers, not {arr.dtype}")
    if arr.dtype.kind == "i" and arr.size and arr.min() < 0:
        raise ValueError(f"{what} holds negative numbers")
    return np.ascontiguousarray(arr, dtype=np.uint64)



def _err(int e, str msg):
    return OSError(e, f"{_errno_mod.errorcode.get(e, e)}: {msg}")


cdef str _reason(gmem_host *h):
    """The rule behind the host's last refused call."""
    return (<bytes>h.reason).decode() if h.reason != NULL else "refused"


cdef int _check_r(gmem_host *h, int r, str what) except -1:
    """r from a kernel rule: >= 0 comes back, -errno raises OSError naming the rule."""
    if r < 0:
        raise _err(-r, f"{what}: {_reason(h)}")
    return r


cdef int _tdx_huge_page_arg(value, platform) except -1:
    """Host(tdx_huge_page=): the proposed kvm_intel.tdx_huge_page (TDX huge pages v3, 2M S-EPT
    leaves; "1G" goes beyond any posted series): 0, PG_LEVEL_2M or PG_LEVEL_1G."""
    if value is False or value is None:
        return 0
    if value is not True and not (isinstance(value, str) and value in ("2M", "1G")):
        raise ValueError(f"tdx_huge_page must be False, True, \"2M\" or \"1G\", not {value!r}")
    if platform != "intel":
        raise ValueError("tdx_huge_page is a kvm_intel module parameter: it needs platform=\"intel\"")
    return PG_LEVEL_1G if value == "1G" else PG_LEVEL_2M
