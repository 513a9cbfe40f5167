"""DeepSpeed JSON configs, installed as ``mapsage_ds.ds_configs`` (read with ``importlib.resources``)."""
