"""Ray Train loops on one harness (harness.py): SFT now; PRM and MAH-DPO plug in the same way."""
