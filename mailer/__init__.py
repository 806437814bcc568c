"""mailer: event invitation campaigns by email with a crash-safe delivery ledger."""

__version__ = "0.1.0"
__all__ = ["__version__"]
