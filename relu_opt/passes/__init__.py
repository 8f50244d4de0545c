"""torch.fx passes: each takes a GraphModule (and keyword options) and returns one."""
