"""Board-level tooling below the edgemeta application: serial wire protocol, console automation, boot provisioning."""
