"""Measuring models: scores on image sets (PSNR, fidelity, SSIM), descriptions of files, bench,
compare, and the reports and plots made of them."""
