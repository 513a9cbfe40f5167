"""DeepSpeed and device glue: accelerator choice, the GCU shim, the engine life cycle, checkpoints."""
