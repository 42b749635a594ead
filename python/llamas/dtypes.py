"""The precisions llamas.load takes, named once for the loader's checks and every command's flags."""

WEIGHT_DTYPES = ("float32", "bfloat16", "int8")   # dtype: int8 quantizes at load
KV_DTYPES = ("float32", "bfloat16", "int8")       # kv_dtype: the KV cache's entries
COMPUTE_DTYPES = ("float32", "bfloat16", "int8")  # compute_dtype: the matrix products' activations


def one_of(names) -> str:
    """'a', 'b' or 'c': the choices as an error message lists them."""
    quoted = [repr(n) for n in names]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]
