import torch


def acc(t: torch.Tensor) -> torch.Tensor:
    """Upcast to the accumulation dtype: float32, or float64 for float64 inputs."""
    return t if t.dtype == torch.float64 else t.float()
