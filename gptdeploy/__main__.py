from gptdeploy.cli import main

main()
