"""Check lowbit's sparse-bitmask tensors against compressed-tensors 0.14 (the last release with its sparse
compressors): byte-identical ``compressed`` / ``bitmask`` / ``row_offsets`` and an exact ``bitmask_decompress``.

Run it where compressed-tensors 0.14 imports, e.g. its wheel unpacked in front of the peers venv::

    pip download compressed-tensors==0.14.0 --no-deps -d /tmp/ct014 && unzip /tmp/ct014/*.whl -d /tmp/ct014/x
    PYTHONPATH=/tmp/ct014/x:src /path/to/peers-venv/bin/python benchmarks/sparse_bitmask_check.py

Writes ``results/sparse_bitmask.json`` and ``.md``.
"""

from __future__ import annotations

import torch

from _results import table_lines, write_results


def main() -> None:
    import compressed_tensors
    from compressed_tensors.compressors.sparse_compressors.sparse_bitmask import bitmask_compress, bitmask_decompress

    from lowbit.export.sparse_bitmask import compress

    g = torch.Generator().manual_seed(0)
    rows = {}
    for shape in [(6, 40), (33, 17), (576, 1536), (1536, 576)]:
        w = torch.randn(*shape, generator=g)
        w[w.abs() < 0.7] = 0
        p = compress(w)
        v, b, r = bitmask_compress(w)
        same = torch.equal(v, p["compressed"]) and torch.equal(b, p["bitmask"]) and torch.equal(r, p["row_offsets"])
        exact = torch.equal(bitmask_decompress(p["compressed"], p["bitmask"], list(w.shape)), w)
        rows[f"{shape[0]}x{shape[1]}"] = {"sparsity": float((w == 0).float().mean()), "same_tensors": same,
                                          "decompress_exact": exact}
    version = getattr(compressed_tensors, "__version__", "0.14")
    body = [[k, f"{r['sparsity']:.3f}", "yes" if r["same_tensors"] else "NO", "yes" if r["decompress_exact"] else "NO"]
            for k, r in rows.items()]
    lines = table_lines([f"# lowbit sparse-bitmask vs compressed-tensors {version}", "",
                         "Random weights with |w| < 0.7 set to 0; lowbit's compress against the library's "
                         "bitmask_compress, and the library's bitmask_decompress of lowbit's tensors."],
                        ["weight", "sparsity", "same tensors", "library decompresses exactly"], body)
    write_results("sparse_bitmask", {"compressed_tensors": version, "rows": rows}, lines)


if __name__ == "__main__":
    main()
