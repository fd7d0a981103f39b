from gptdeploy.app.cli import main

main()
