"""kvferry.transport."""
