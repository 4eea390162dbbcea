"""The compile records both kernel languages keep (tests/sm90_baseline.json for Triton,
tests/cuda_sm90_baseline.json for CUDA): one rule for what counts as worse, one file format."""
import json

# Set to 1, the compile tests rewrite their records instead of checking against them.
UPDATE = "MINIGPT_UPDATE_SM90_BASELINE"


def stack_grew(was: int, now: int) -> bool:
    """More stack bytes a thread (spills, or an array moved to local memory) than recorded,
    past the slack of a small change: a quarter more and 64 bytes."""
    return now > max(was * 1.25, was + 64)


def write_record(path: str, record: dict):
    """``record`` as JSON, a line a kernel in key order: the file's diff names what moved."""
    with open(path, "w") as f:
        f.write("{\n" + ",\n".join(f"{json.dumps(k)}: {json.dumps(v)}"
                                    for k, v in sorted(record.items())) + "\n}\n")
