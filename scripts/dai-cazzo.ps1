# The seed's smoke flow (PowerShell): wait for /diag, pull, poll the job, /models, /chat.
#   .\scripts\dai-cazzo.ps1 [-Model smollm2:135m] [-Base http://127.0.0.1:8005]
# A Model with a '/' is a Hub repo id and is pulled first; other names must be local already.
# scripts/smoke.sh is the same flow in bash (and is the one the tests run).
param(
    [string]$Model = "smollm2:135m",
    [string]$Base = "http://127.0.0.1:8005"
)
$ErrorActionPreference = "Stop"

$deadline = (Get-Date).AddSeconds(120)
while ($true) {
    try { Invoke-RestMethod "$Base/diag" | Out-Null; break }
    catch { if ((Get-Date) -gt $deadline) { throw "server not answering at $Base" }; Start-Sleep 1 }
}
Write-Host "server up at $Base"

if ($Model.Contains("/")) {
    $job = Invoke-RestMethod -Method Post "$Base/pull" -ContentType "application/json" `
        -Body (@{ model = $Model } | ConvertTo-Json)
    Write-Host "pull job $($job.job_id)"
    while ($true) {
        $state = Invoke-RestMethod "$Base/jobs/$($job.job_id)"
        Write-Host ("  {0} {1:P0}" -f $state.status, $state.progress)
        if ($state.status -eq "succeeded") { break }
        if ($state.status -eq "failed") { throw "pull failed: $($state.error)" }
        Start-Sleep 1
    }
}

$models = Invoke-RestMethod "$Base/models"
Write-Host ("models: " + (($models.models | ForEach-Object { $_.name }) -join ", "))
$body = @{
    model = $Model; temperature = 0; max_tokens = 32
    messages = @(@{ role = "user"; content = "What is the capital of France?" })
} | ConvertTo-Json -Depth 5
$reply = Invoke-RestMethod -Method Post "$Base/chat" -ContentType "application/json" -Body $body
Write-Host "chat: $($reply.message.content)"
Write-Host "smoke OK"
