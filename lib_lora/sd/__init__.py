"""Stable Diffusion model building for standalone and CLI use (diffusers modules): tiny recipes,
single-file checkpoint loading, sampling. Never imported on the web-UI path."""
