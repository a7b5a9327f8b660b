#!/usr/bin/env python3
"""Run the bs-coordination lock service (same flags as ``python -m bs_coordination.service``)."""

from bs_coordination.service.__main__ import main

if __name__ == "__main__":
    main()
