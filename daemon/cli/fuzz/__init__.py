"""`kvferry fuzz`: hostile frames and requests at a running deployment, then checks."""
