"""Graph colorings of a sparsity pattern, in numpy, for compressed Jacobians and Hessians.

A pattern is given as its nonzero coordinates ``rows, cols`` (numpy integer arrays) and
its shape. Each coloring groups columns (or rows) so that one product with the sum of a
group's basis vectors recovers every entry of the group directly (no substitution):

- ``column_coloring``: columns that share a row get different colors (a distance-2
  coloring of the column intersection graph). Forward mode: one JVP per color, and
  ``J[i, j]`` is entry ``i`` of the product of ``j``'s color.
- ``row_coloring``: the same on the transpose. Reverse mode: one VJP per color.
- ``star_coloring``: for a symmetric pattern, a proper coloring of its adjacency graph in
  which every path on four vertices has at least three colors (Coleman and Moré; Gebremedhin,
  Manne and Pothen, "What color is your Jacobian?", 2005). Each ``H[i, j]`` is then read
  directly from the product of ``j``'s color at row ``i`` or of ``i``'s color at row ``j``:
  one HVP per color, and often far fewer colors than a distance-2 coloring (an arrowhead
  needs 2 against n).
- ``distance1_coloring``: neighbors in the adjacency graph differ, which is all that the
  diagonal of a symmetric matrix needs (``H[i, i]`` is entry ``i`` of the product of
  ``i``'s color).

All are greedy, with vertices in largest-first order of their degree (ties by index), and
take time about the sum over rows (vertices) of the squared row counts (degrees).
"""

from __future__ import annotations

import numpy as np


def column_coloring(rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Colors of the columns such that two columns with a nonzero in a common row differ.

    >>> import numpy as np
    >>> column_coloring(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 2]), (2, 3)).tolist()
    [1, 0, 1]
    """
    m, n = shape
    if n and np.bincount(rows, minlength=m).max(initial=0) == n:
        return np.arange(n)  # a full row: every column needs a color of its own
    col_rows = _groups(cols, rows, n)
    row_cols = _groups(rows, cols, m)
    # Degree in the column intersection graph, bounded above by the counts of its rows.
    row_counts = np.bincount(rows, minlength=m)
    degree = np.bincount(cols, weights=row_counts[rows] - 1, minlength=n)
    return _greedy(_largest_first(degree), n, lambda v: (w for i in col_rows[v] for w in row_cols[i]))


def row_coloring(rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Colors of the rows such that two rows with a nonzero in a common column differ.

    >>> import numpy as np
    >>> row_coloring(np.array([0, 1, 2]), np.array([0, 0, 1]), (3, 2)).tolist()
    [0, 1, 0]
    """
    return column_coloring(cols, rows, (shape[1], shape[0]))


def distance1_coloring(rows: np.ndarray, cols: np.ndarray, n: int) -> np.ndarray:
    """Colors of the vertices of the (symmetric) pattern's graph: neighbors differ.

    >>> import numpy as np
    >>> distance1_coloring(np.array([0, 1, 1, 2]), np.array([1, 0, 2, 1]), 3).tolist()
    [1, 0, 1]
    """
    adj = _adjacency(rows, cols, n)
    degree = np.array([len(a) for a in adj], dtype=np.int64)
    return _greedy(_largest_first(degree), n, lambda v: adj[v])


def star_coloring(rows: np.ndarray, cols: np.ndarray, n: int) -> np.ndarray:
    """A star coloring of the symmetric pattern's graph (the diagonal is ignored).

    A proper coloring in which no path on four vertices uses only two colors. Coloring
    ``v`` with ``c`` could make such a path only through ``v``, so the greedy forbids:
    the colors of ``v``'s neighbors ``w``; the color of ``x`` (a neighbor of ``w``) when
    ``x`` has another neighbor of ``w``'s color (path v-w-x-y) or when ``v`` has another
    neighbor of ``w``'s color (path y-v-w-x).

    >>> import numpy as np
    >>> hub = np.zeros(4, int); leaves = np.arange(1, 5)
    >>> star_coloring(np.r_[hub, leaves], np.r_[leaves, hub], 5).tolist()  # an arrowhead
    [0, 1, 1, 1, 1]
    """
    adj = _adjacency(rows, cols, n)
    color = [-1] * n
    forbidden = [-1] * (n + 1)
    neighbor_colors: list[dict[int, int]] = [{} for _ in range(n)]  # color -> count, per vertex
    degree = np.array([len(a) for a in adj], dtype=np.int64)
    for v in _largest_first(degree).tolist():
        counts = neighbor_colors[v]
        for w in adj[v]:
            cw = color[w]
            if cw < 0:
                continue
            forbidden[cw] = v
            twice = counts[cw] >= 2  # v has another neighbor of w's color
            for x in adj[w]:
                cx = color[x]
                if x != v and cx >= 0 and (twice or neighbor_colors[x].get(cw, 0) >= 2):
                    forbidden[cx] = v
        c = _smallest_free(forbidden, v)
        color[v] = c
        for w in adj[v]:
            neighbor_colors[w][c] = neighbor_colors[w].get(c, 0) + 1
    return np.asarray(color, dtype=np.int64)


def num_colors(colors: np.ndarray) -> int:
    return int(colors.max()) + 1 if colors.size else 0


# --- helpers --------------------------------------------------------------------------


def _greedy(order: np.ndarray, n: int, neighbors) -> np.ndarray:
    """The smallest color not used by a colored neighbor, vertex by vertex in `order`.

    `forbidden[c] == v` marks color c as taken while coloring v, so the array is never
    cleared (ColPack's trick)."""
    color = [-1] * n
    forbidden = [-1] * (n + 1)
    for v in order.tolist():
        for w in neighbors(v):
            cw = color[w]
            if cw >= 0:
                forbidden[cw] = v
        color[v] = _smallest_free(forbidden, v)
    return np.asarray(color, dtype=np.int64)


def _smallest_free(forbidden: list[int], v: int) -> int:
    c = 0
    while forbidden[c] == v:
        c += 1
    return c


def _largest_first(degree: np.ndarray) -> np.ndarray:
    """Vertices by decreasing degree, ties by increasing index (a stable sort)."""
    return np.argsort(-np.asarray(degree), kind="stable")


def _groups(keys: np.ndarray, values: np.ndarray, size: int) -> list[list[int]]:
    """`values` grouped by `keys` in 0..size-1, as Python lists (fast to loop over)."""
    order = np.argsort(keys, kind="stable")
    bounds = np.searchsorted(keys[order], np.arange(size + 1))
    sorted_values = values[order].tolist()
    return [sorted_values[bounds[k]:bounds[k + 1]] for k in range(size)]


def _adjacency(rows: np.ndarray, cols: np.ndarray, n: int) -> list[list[int]]:
    """Neighbor lists of the graph of a symmetric pattern, without self-loops."""
    off = rows != cols
    return _groups(rows[off], cols[off], n)
