"""Type stub for the compiled module trustrepair._dpp (csrc/dpp_bindings.cpp, csrc/dpp_greedy.cpp).

Users call trustrepair.methods.selection.select_dpp, which validates, normalises the scores and picks gamma.
"""
import numpy as np
import numpy.typing as npt

def greedy(
    scores: npt.NDArray[np.float64],
    embeddings: npt.NDArray[np.float32] | npt.NDArray[np.float64],
    k: int,
    eta: float,
    gamma: float,
    lazy: bool = True,
    num_threads: int = 0,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64], int, int]:
    """Greedy MAP selection for f(S) = log det(K_S + I) + eta * log(sum_{i in S} s_i).

    K_ij = exp(-gamma * ||e_i - e_j||^2). Releases the GIL; the result does not depend on num_threads
    (<= 0 = OpenMP default) nor on lazy.

    Args:
        scores: (N,) float64, s_i >= 0 (already normalised), some s_i > 0 when eta > 0.
        embeddings: (N, d) float32 or float64, finite; other dtypes are converted to float64.
        k: number of picks (>= 0; k >= N selects all N).
        eta: weight of the score term, finite and >= 0.
        gamma: RBF bandwidth, finite and > 0.
        lazy: lazy (priority queue of stale gain bounds) or eager greedy.
        num_threads: OpenMP threads.

    Returns:
        (picks (m,) int64 in selection order, gains (m,) float64 with gains[0] = f({picks[0]}) and
        gains[t] = f(S_{t+1}) - f(S_t), kernel entries evaluated, candidate rows read).

    Raises:
        ValueError: empty, mismatched, non-finite (naming the first bad row) or out-of-range input.
    """

def simd_variant() -> str:
    """The SIMD variant a selection uses: the widest this CPU runs ('avx512', 'avx2', 'baseline'), or the
    one named by the environment variable TRUSTREPAIR_DPP_SIMD (ValueError if it is not supported)."""

def simd_variants() -> list[str]:
    """The SIMD variants this CPU runs, widest first."""

def _kernel_exp(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """exp(x) for x <= 0 as the selector's kernels compute it (current simd_variant()); for tests."""
