from cxr.train import main

main()
