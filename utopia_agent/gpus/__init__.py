"""GPUs: the NVML inventory, the sampler, health and quarantine, selection, and the NVML watchdog."""
