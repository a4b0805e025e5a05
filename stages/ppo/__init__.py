"""PPO with the PPO-max tricks (../shared/PPO-MAX.md). tricks.py: every trick as a pure tensor function."""
