"""Memory planning: ZeRO model states, activation memory, the plan, the dry run."""
