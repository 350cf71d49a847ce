"""The fleet console (issue 12): server-rendered pages under ``/ui/``."""
