"""Experiment tracks: the tracks file, launch commands, the runner, the leaderboard."""
