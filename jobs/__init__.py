"""One entry point per stage: `python -m jobs.<stage> --config jobs/configs/<stage>.yaml [--key value ...]`."""
