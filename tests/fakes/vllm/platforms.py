"""``vllm.platforms.current_platform``: the fake stands for a CUDA build (the one a CPU cannot run)."""


class _Cuda:
    device_type = "cuda"

    def is_cpu(self) -> bool:
        return False


current_platform = _Cuda()
