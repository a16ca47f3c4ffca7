"""kvferry.daemon."""
