"""Metrics over precomputed features: Gaussian statistics, usability (DPS / FCS / U),
per-image baselines (SSIM, PSNR, Inception Score, realism, PRDC) and FID / KID.

Modules:
  gaussian    streaming float64 Gaussian statistics, per class and per "not this class"
  usability   point Frechet distance, DPS, FCS, U and normalised aggregates
  baselines   SSIM, PSNR, Inception Score, realism score, precision/recall/density/coverage
  fid         Frechet distance between Gaussians, FID from features, KID
"""
