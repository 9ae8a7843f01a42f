def test_home(server):
    with server.client() as client:
        response = client.get("/")
    assert response.status_code == 200
    assert response.json() == {"message": "Welcome to RK-LLama!", "github": "https://github.com/notpunhnox/rkllama"}
