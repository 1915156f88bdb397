"""Whether the runs of a comparison read the same data, from the data fingerprints in their meta.json.

Runs on different data are refused by `compare` unless --force (and the report then says so). Every
split that two runs both read must match (trial keys and labels; features where both hashed them with
the same definition); the training split of a run trained on a fraction of it
(`data_params.train_fraction` < 1) is its decoder's own, not the data compared.
"""

from __future__ import annotations

from harness.run_reader import Run


def fingerprint(run: Run) -> dict:
    """meta.json's data_fingerprint ({} for a run written without one)."""
    return run.meta.get("data_fingerprint") or {}


def _same_hashes(keys_a, keys_b, features_a, features_b) -> bool:
    """Same trial keys and labels; same features too where both runs hashed them (features read
    from HDF5 on demand are not hashed, so a hash missing on one side is not a difference)."""
    if keys_a is None or keys_a != keys_b:
        return False
    return features_a is None or features_b is None or features_a == features_b


def _features_comparable(fp_a: dict, fp_b: dict) -> bool:
    """Features hashes of the same definition (harness.data.FEATURES_HASH_VERSION; 1 when absent)."""
    return fp_a.get("features_hash_version", 1) == fp_b.get("features_hash_version", 1)


def _trained_on_a_fraction(run: Run) -> bool:
    fraction = run.flat_config.get("data_params.train_fraction")
    return isinstance(fraction, (int, float)) and fraction < 1


def _same_data(a: Run, b: Run) -> bool:
    """Runs read the same data when every split both read is the same (a run that also decoded
    test, or an `evaluate` run that read one split, still matches). Fingerprints from before
    meta.json had per-split hashes are compared whole. The train split of a run trained on a share of
    it (data_params.train_fraction < 1: a seeded draw, a data_scaling point) is part of the decoder,
    shown in "What differs", and not compared."""
    fp_a, fp_b = fingerprint(a), fingerprint(b)
    by_a, by_b = fp_a.get("by_split"), fp_b.get("by_split")
    features = _features_comparable(fp_a, fp_b)  # else only the keys and labels are compared
    if by_a and by_b:
        shared = set(by_a) & set(by_b)
        if _trained_on_a_fraction(a) or _trained_on_a_fraction(b):
            shared.discard("train")
        return bool(shared) and all(
            _same_hashes(by_a[s].get("keys_hash"), by_b[s].get("keys_hash"),
                         by_a[s].get("features_hash") if features else None, by_b[s].get("features_hash")) for s in shared)
    if not features:
        return _same_hashes(fp_a.get("keys_hash"), fp_b.get("keys_hash"), None, None)
    return _same_hashes(fp_a.get("keys_hash"), fp_b.get("keys_hash"), fp_a.get("content_hash"), fp_b.get("content_hash"))


def data_groups(runs: list[Run]) -> list[list[Run]]:
    """Runs grouped by the data they read; a run without a fingerprint is a group of its own."""
    groups: list[list[Run]] = []
    for run in runs:
        group = next((g for g in groups if _same_data(g[0], run)), None)
        if group is None:
            groups.append([run])
        else:
            group.append(run)
    return groups


def describe_groups(groups: list[list[Run]]) -> str:
    """The data groups in one line, for the refusal and the report's warning: "a, b (data 1234abcd) vs c (...)"."""
    def names(group):
        shown = ", ".join(r.name for r in group[:3])
        return shown + (f" and {len(group) - 3} more" if len(group) > 3 else "")

    def data(group):
        keys = fingerprint(group[0]).get("keys_hash")
        return f"data {keys[:8]}" if keys else "no fingerprint"

    return " vs ".join(f"{names(g)} ({data(g)})" for g in groups)
