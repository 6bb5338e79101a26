"""Code that runs inside a SnowFlock guest: the XenStore agent (sf-guestd) first."""
